"""Lifetimes in Redis: the run lock of a run that died frees itself after
`PIPELINE_LOCK_TTL_SECONDS`, and a cached dashboard result is recomputed after
`PIPELINE_CACHE_TTL_SECONDS` (or its panel's own lifetime)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flows.cache import QueryCache
from flows.lock import run_guard
from flows.redis_link import RedisLink
from flows.settings import FlowSettings

LOG = logging.getLogger("test")


@pytest.fixture
def short_lived(stack: Any) -> FlowSettings:
    return FlowSettings(
        redis_prefix=f"test-ttl-{uuid.uuid4().hex[:8]}", lock_ttl_seconds=3, cache_ttl_seconds=3
    )


@pytest.fixture
def link(short_lived: FlowSettings) -> Iterator[RedisLink]:
    opened = RedisLink(short_lived, LOG)
    yield opened
    opened.close()


def wait_until_gone(client: redis.Redis, key: str) -> None:
    """Wait for Redis to expire `key` (bounded: a key without a lifetime fails here)."""
    deadline = time.monotonic() + 30
    while client.exists(key):
        assert time.monotonic() < deadline, f"{key} never expired (TTL {client.ttl(key)})"
        time.sleep(0.2)


def test_the_lock_of_a_run_that_died_frees_itself_after_its_ttl(
    short_lived: FlowSettings, link: RedisLink, redis_client: redis.Redis
) -> None:
    key = short_lived.key("lock", "sync")
    crashed = run_guard(short_lived, link, "run-that-died", LOG)
    assert crashed.__enter__().acquired  # and never exits, as a killed process would not
    assert 0 < redis_client.ttl(key) <= short_lived.lock_ttl_seconds

    with run_guard(short_lived, link, "next-run", LOG) as guard:
        assert (guard.acquired, guard.holder) == (False, "run-that-died")
    wait_until_gone(redis_client, key)

    with run_guard(short_lived, link, "run-after-the-ttl", LOG) as guard:
        assert (guard.acquired, guard.mechanism) == (True, "redis")


def compute_counting(calls: list[int]) -> Any:
    def compute() -> list[dict[str, int]]:
        calls.append(1)
        return [{"files": len(calls)}]

    return compute


def test_a_cached_result_is_recomputed_after_the_cache_ttl(
    short_lived: FlowSettings, link: RedisLink, redis_client: redis.Redis
) -> None:
    cache = QueryCache(short_lived, link)
    calls: list[int] = []
    first = cache.get_or_compute("backlog", compute_counting(calls))
    (key,) = redis_client.keys(short_lived.key("cache", "v*", "backlog", "*"))
    assert 0 < redis_client.ttl(key) <= short_lived.cache_ttl_seconds
    assert cache.get_or_compute("backlog", compute_counting(calls)).hit
    wait_until_gone(redis_client, key)

    again = cache.get_or_compute("backlog", compute_counting(calls))

    assert (first.hit, again.hit, again.rows, len(calls)) == (False, False, [{"files": 2}], 2)


def test_a_panel_lifetime_overrides_the_cache_ttl(
    short_lived: FlowSettings, link: RedisLink, redis_client: redis.Redis
) -> None:
    cache = QueryCache(short_lived, link)

    cache.get_or_compute("last_runs", lambda: [{"run": "x"}], ttl_seconds=30)

    (key,) = redis_client.keys(short_lived.key("cache", "v*", "last_runs", "*"))
    assert short_lived.cache_ttl_seconds < redis_client.ttl(key) <= 30
