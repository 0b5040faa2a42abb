"""One Redis connection per flow run / dashboard call that degrades to "no Redis", warning once.

Redis is an accelerator here (cache, lock, change signals), never a dependency: when it is down
the caller gets `None` and carries on, and the operator reads one warning, not one per query.
A long-lived caller (the web server, a change follower) uses `RetryingRedisLink`, which tries
again a while after a failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from flows.settings import FlowSettings
from loader.clients import connect_redis

T = TypeVar("T")

REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)


# What a flow run goes without when Redis is down (the warning's middle).
FLOW_RUN_WITHOUT_REDIS = (
    "running without the query cache and the Redis lock; overlap is guarded by a Prefect "
    "concurrency limit instead."
)
# What a change follower goes without: telling open dashboard pages of each settled batch.
FOLLOWER_WITHOUT_REDIS = (
    "the follower goes on storing changes, but open dashboard pages see them only once a flow "
    "run lands."
)
# What the web dashboard goes without.
WEB_WITHOUT_REDIS = (
    "serving every panel from ClickHouse, without the query cache and without live page updates."
)


class RedisLink:
    """A lazily connected Redis client that reports the first failure once and then stays quiet.
    `without` says in the warning what the caller goes without."""

    def __init__(
        self,
        settings: FlowSettings,
        logger: logging.Logger | logging.LoggerAdapter,
        *,
        without: str = FLOW_RUN_WITHOUT_REDIS,
    ):
        self._settings = settings
        self._logger = logger
        self._without = without
        self._client: redis.Redis | None = None
        self.down = False
        self.warned = False

    def _mark_down(self, exc: BaseException) -> None:
        self.down = True
        if not self.warned:
            self.warned = True
            self._logger.warning(
                "Redis at %s is unreachable (%s): %s Start Redis (`make up`) or fix REDIS_URL "
                "to restore them.",
                self._settings.redis_url,
                exc,
                self._without,
            )

    def client(self) -> redis.Redis | None:
        """The client if Redis answered so far (checked with a PING on first use), else None."""
        if self.down:
            return None
        if self._client is None:
            self._client = connect_redis(self._settings)
            try:
                self._client.ping()
            except REDIS_ERRORS as exc:
                self._mark_down(exc)
                return None
        return self._client

    def call(self, fn: Callable[[redis.Redis], T], default: T) -> T:
        """Run `fn(client)`; on a Redis failure return `default` (warning once).

        After one failure the link stays down for its lifetime (one flow run or one dashboard
        call), so a dead Redis costs one connect timeout, not one per query.
        """
        client = self.client()
        if client is None:
            return default
        try:
            return fn(client)
        except REDIS_ERRORS as exc:
            self._mark_down(exc)
            return default

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class RetryingRedisLink(RedisLink):
    """A `RedisLink` for a long-lived process: after a failure it tries again `retry_after_s`
    later instead of staying down for good (a flow run's link lives for one run only)."""

    retry_after_s = 5.0

    def __init__(
        self,
        settings: FlowSettings,
        logger: logging.Logger | logging.LoggerAdapter,
        *,
        without: str = FLOW_RUN_WITHOUT_REDIS,
    ):
        super().__init__(settings, logger, without=without)
        self._down_since = 0.0
        self._lock = threading.Lock()

    def _mark_down(self, exc: BaseException) -> None:
        self._down_since = time.monotonic()
        super()._mark_down(exc)

    def client(self) -> redis.Redis | None:
        if self.down and time.monotonic() - self._down_since > self.retry_after_s:
            with self._lock:
                if self.down:
                    self.down = False
                    self.close()
        return super().client()
