"""Dashboard query cache in Redis, keyed by a data version that every landed sync bumps.

A key is `<prefix>:cache:v<version>:<query>:<params hash>`. The flow increments the version after
each build lands, so a lookup after a sync misses and recomputes: the cache never serves data
older than the last sync. Old versions simply age out by TTL. Hits and misses are counted in a
Redis hash so the hit rate can be alerted on.

Queries of the run history (`scope="runs"`: `ops.*`) are keyed by a second counter,
`<prefix>:runs_version`, that every flow run bumps when it ends (ok, skipped or failed), so a
failed run shows at once although it bumps no data version. Each bump is also published on the
channel `<prefix>:events` (`{"data": <version>}` / `{"runs": <version>}`): the web dashboard
pushes it to open pages (server-sent events), so no viewer polls ClickHouse.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from flows.redis_link import FOLLOWER_WITHOUT_REDIS, RedisLink, RetryingRedisLink
from flows.settings import FlowSettings

if TYPE_CHECKING:
    from loader.follower import StoredBatch

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


@dataclass
class Lookup:
    rows: Rows
    hit: bool  # False also when Redis is down (nothing cached)
    version: str | None


def _json(rows: Rows) -> str:
    # str() for datetimes/decimals: the dashboard renders text, and hits and misses must return
    # the same types, so a miss also returns the JSON round trip.
    return json.dumps(rows, default=str, separators=(",", ":"))


def events_channel(settings: FlowSettings) -> str:
    """The pub/sub channel on which every version bump is announced."""
    return settings.key("events")


class QueryCache:
    def __init__(self, settings: FlowSettings, link: RedisLink):
        self._settings = settings
        self._link = link
        self._version_key = settings.key("data_version")
        self._runs_key = settings.key("runs_version")
        self._stats_key = settings.key("cache", "stats")
        self._channel = events_channel(settings)

    def data_version(self) -> str | None:
        """The current data version ("0" before the first sync), or None without Redis."""
        return self._link.call(lambda c: cast(str | None, c.get(self._version_key)) or "0", None)

    def versions(self) -> tuple[str, str] | None:
        """(data version, runs version), "0" before the first bump; None without Redis."""

        def read(c: Any) -> tuple[str, str]:
            data, runs = c.mget(self._version_key, self._runs_key)
            return data or "0", runs or "0"

        return self._link.call(read, None)

    def _bump(self, key: str, field: str) -> int | None:
        def bump(c: Any) -> int:
            version = int(c.incr(key))
            c.publish(self._channel, json.dumps({field: version}))
            return version

        return self._link.call(bump, None)

    def bump_version(self) -> int | None:
        """Called after each landed sync: every cached entry becomes unreachable."""
        return self._bump(self._version_key, "data")

    def bump_runs(self) -> int | None:
        """Called when a flow run ends, whatever its outcome: run-history entries expire."""
        return self._bump(self._runs_key, "runs")

    def _key(self, version: str, name: str, params: dict[str, Any] | None) -> str:
        digest = hashlib.sha1(
            json.dumps(params or {}, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        return self._settings.key("cache", f"v{version}", name, digest)

    def lookup_many(
        self,
        entries: Sequence[tuple[str, dict[str, Any] | None, str]],
        versions: tuple[str, str],
    ) -> list[Rows | None]:
        """The cached rows of several queries (`(name, params, scope)`) in one round trip, None
        for each miss (compute those with `get_or_compute`, which counts the miss); counts the
        hits. Keys as `get_or_compute` builds them under `versions`."""
        keys = [
            self._key(versions[0] if scope != "runs" else f"{versions[0]}r{versions[1]}", n, p)
            for n, p, scope in entries
        ]

        def read(c: Any) -> list[str | None]:
            values = c.mget(keys)
            hits = sum(v is not None for v in values)
            if hits:
                c.hincrby(self._stats_key, "hits", hits)
            return values

        values = self._link.call(read, None)
        if values is None:
            return [None] * len(entries)
        return [None if v is None else json.loads(v) for v in values]

    def get_or_compute(
        self,
        name: str,
        compute: Callable[[], Rows],
        params: dict[str, Any] | None = None,
        ttl_seconds: int | None = None,
        scope: str = "data",
        versions: tuple[str, str] | None = None,
    ) -> Lookup:
        """`scope="runs"`: the rows also depend on the run history (`ops.*`), so the key
        carries the runs version too. `versions`: (data, runs) as read once by the caller (a
        page reads them once for all its queries: one consistent snapshot, fewer round
        trips); None reads them here."""
        if versions is None:
            versions = self.versions() if scope == "runs" else None
            data = versions[0] if versions else self.data_version()
        else:
            data = versions[0]
        if scope == "runs":
            version = None if versions is None else f"{versions[0]}r{versions[1]}"
        else:
            version = data
        if version is None:  # no Redis: straight to ClickHouse, nothing counted
            return Lookup(json.loads(_json(compute())), hit=False, version=None)
        key = self._key(version, name, params)
        cached = self._link.call(lambda c: c.get(key), None)
        if cached is not None:
            self._link.call(lambda c: c.hincrby(self._stats_key, "hits", 1), None)
            return Lookup(json.loads(cached), hit=True, version=version)
        payload = _json(compute())
        ttl = ttl_seconds or self._settings.cache_ttl_seconds

        def store(c: Any) -> None:
            pipe = c.pipeline()
            pipe.set(key, payload, ex=ttl)
            pipe.hincrby(self._stats_key, "misses", 1)
            pipe.execute()

        self._link.call(store, None)
        return Lookup(json.loads(payload), hit=False, version=version)

    def stats(self) -> CacheStats | None:
        raw = self._link.call(lambda c: c.hgetall(self._stats_key), None)
        if raw is None:
            return None
        return CacheStats(hits=int(raw.get("hits", 0)), misses=int(raw.get("misses", 0)))

    def take_stats(self) -> CacheStats | None:
        """Read and reset the counters atomically: each flow run judges the hit rate of the
        lookups since the previous run, so one bad hour does not alert forever."""

        def take(c: Any) -> dict[str, str]:
            pipe = c.pipeline(transaction=True)
            pipe.hgetall(self._stats_key)
            pipe.delete(self._stats_key)
            return pipe.execute()[0]

        raw = self._link.call(take, None)
        if raw is None:
            return None
        return CacheStats(hits=int(raw.get("hits", 0)), misses=int(raw.get("misses", 0)))


@contextmanager
def settled_batch_refresher(
    settings: FlowSettings, logger: logging.Logger | logging.LoggerAdapter
) -> Iterator[Callable[[StoredBatch], bool]]:
    """A change follower's `on_stored` hook (the service's and `python -m loader watch`'s):
    after a batch settled into `pipeline_state` it bumps the data version, so open pages show
    the new state at once, and returns True; a batch the hot path does not carry to the
    dashboard (not settled) it leaves to the caller and returns False. Its Redis link, closed
    on exit, warns once while Redis is down and tries it again a few seconds later."""
    link = RetryingRedisLink(settings, logger, without=FOLLOWER_WITHOUT_REDIS)
    cache = QueryCache(settings, link)

    def refresh(batch: StoredBatch) -> bool:
        if batch.settled is None:
            return False
        cache.bump_version()
        return True

    try:
        yield refresh
    finally:
        link.close()
