"""A Redis connection that degrades to "no Redis", warning once: one per flow run or dashboard
call (`RedisLink`), or one per long-lived process (`RetryingRedisLink`: the web server, a change
follower), which tries Redis again a while after a failure.

Redis is an accelerator here (cache, lock, change signals), never a dependency: when it is down
or refuses a command (out of memory, read-only) the caller gets its default and carries on, and
the operator reads one warning, saying what goes missing, not one per query.
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
    `without` says in the warning what the caller goes without. Thread-safe: threads share its
    client (a connection pool)."""

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
        self._lock = threading.Lock()  # guards connecting and dropping the client
        self.down = False
        self.warned = False

    def _warn_once(self, problem: str, exc: BaseException, fix: str) -> None:
        if not self.warned:
            self.warned = True
            self._logger.warning(
                "Redis at %s %s (%s): %s %s",
                self._settings.redis_url,
                problem,
                exc,
                self._without,
                fix,
            )

    def _mark_down(self, exc: BaseException) -> None:
        self.down = True
        self._warn_once("is unreachable", exc, "Start Redis (`make up`) or fix REDIS_URL.")

    def client(self) -> redis.Redis | None:
        """The client if Redis answered so far (checked with a PING on first use), else None."""
        if self.down:
            return None
        if self._client is not None:
            return self._client
        with self._lock:
            if self._client is None and not self.down:
                fresh = connect_redis(self._settings)
                try:
                    fresh.ping()
                except REDIS_ERRORS as exc:
                    fresh.close()
                    self._mark_down(exc)
                    return None
                self._client = fresh
            return None if self.down else self._client

    def call(self, fn: Callable[[redis.Redis], T], default: T) -> T:
        """Run `fn(client)`; on a Redis failure return `default` (warning once).

        After Redis is found unreachable the link stays down (for good here; for a while in
        `RetryingRedisLink`), so a dead Redis costs one connect timeout, not one per query. A
        command Redis refuses (out of memory, read-only replica) costs only that call.
        """
        client = self.client()
        if client is None:
            return default
        try:
            return fn(client)
        except REDIS_ERRORS as exc:
            self._mark_down(exc)
        except redis.RedisError as exc:
            self._warn_once("refused a command", exc, "Check the Redis server's memory and log.")
        return default

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        with self._lock:
            self._drop_client()


class RetryingRedisLink(RedisLink):
    """A `RedisLink` for a long-lived process: after Redis was found unreachable it tries again
    `retry_after_s` later instead of staying down for good, and once Redis answers again it
    says so and warns again at the next outage."""

    retry_after_s = 5.0

    def __init__(
        self,
        settings: FlowSettings,
        logger: logging.Logger | logging.LoggerAdapter,
        *,
        without: str,
    ):
        super().__init__(settings, logger, without=without)
        self._down_since = 0.0

    def _mark_down(self, exc: BaseException) -> None:
        self._down_since = time.monotonic()
        super()._mark_down(exc)

    def client(self) -> redis.Redis | None:
        retrying = False
        if self.down and time.monotonic() - self._down_since > self.retry_after_s:
            with self._lock:
                if self.down:
                    self.down = False
                    self._drop_client()
                    retrying = True
        client = super().client()
        if retrying and client is not None:
            self._logger.info("Redis at %s answers again", self._settings.redis_url)
            self.warned = False
        return client
