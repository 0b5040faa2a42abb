"""The live-update listener against a real Redis: bumps many times a second reach open pages as
at most one `version` event per interval, and the last event carries the latest versions."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flows.cache import QueryCache
from flows.redis_link import RedisLink
from web.live import Broadcaster
from web.settings import WebSettings

INTERVAL_S = 0.5


async def _collect(broadcaster: Broadcaster, until: float) -> list[tuple[float, dict[str, Any]]]:
    events: list[tuple[float, dict[str, Any]]] = []
    stream = broadcaster.events()
    try:
        while time.monotonic() < until:
            try:
                event = await asyncio.wait_for(anext(stream), until - time.monotonic())
            except TimeoutError:
                break
            if event.get("event") == "version":
                events.append((time.monotonic(), json.loads(event["data"])))
    finally:
        await stream.aclose()
    return events


def test_a_burst_of_bumps_reaches_pages_as_one_event_per_interval_with_the_latest_versions(
    stack: Any,
) -> None:
    settings = WebSettings(
        redis_prefix=f"test-{uuid.uuid4().hex[:8]}", web_live_min_interval_seconds=INTERVAL_S
    )
    cache = QueryCache(settings, RedisLink(settings, logging.getLogger("test")))

    async def scenario() -> tuple[list[tuple[float, dict[str, Any]]], int, float]:
        broadcaster = Broadcaster(settings, poll_s=0.05)
        await broadcaster.start()
        try:
            started = time.monotonic()
            collector = asyncio.create_task(_collect(broadcaster, started + 3.0))
            await asyncio.sleep(0.3)  # the first event (the versions on connection) is out
            last = 0
            burst_started = time.monotonic()
            for _ in range(40):  # 40 bumps in about 1 s, as a follower under a steady writer
                last = cache.bump_version() or 0
                await asyncio.sleep(0.025)
            return await collector, last, burst_started
        finally:
            await broadcaster.stop()

    # A thread of its own: the browser tests' Playwright may hold an event loop in this one.
    with ThreadPoolExecutor(1) as pool:
        events, last, burst_started = pool.submit(asyncio.run, scenario()).result(timeout=60)
    during = [(t, v) for t, v in events if t >= burst_started]
    assert last >= 40
    assert during, "no version event reached the page during the burst"
    assert during[-1][1]["data"] == str(last), "the last event must carry the latest version"
    assert len(during) <= 4, f"{len(during)} events for 40 bumps in about 1 s"
    gaps = [b - a for (a, _), (b, _) in zip(during, during[1:], strict=False)]
    assert all(gap >= INTERVAL_S * 0.9 for gap in gaps), gaps
