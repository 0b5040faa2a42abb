"""One Redis connection per flow run / dashboard call that degrades to "no Redis", warning once.

Redis is an accelerator here (cache, lock, change signals), never a dependency: when it is down
the caller gets `None` and carries on, and the operator reads one warning, not one per query.
"""

from __future__ import annotations

import logging
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


class RedisLink:
    """A lazily connected Redis client that reports the first failure once and then stays quiet."""

    def __init__(self, settings: FlowSettings, logger: logging.Logger | logging.LoggerAdapter):
        self._settings = settings
        self._logger = logger
        self._client: redis.Redis | None = None
        self.down = False
        self.warned = False

    def _mark_down(self, exc: BaseException) -> None:
        self.down = True
        if not self.warned:
            self.warned = True
            self._logger.warning(
                "Redis at %s is unreachable (%s): running without the query cache and the Redis "
                "lock; overlap is guarded by a Prefect concurrency limit instead. Start Redis "
                "(`make up`) or fix REDIS_URL to restore them.",
                self._settings.redis_url,
                exc,
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
