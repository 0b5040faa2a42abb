"""Live updates: one listener per server, fanned out to every open page as server-sent events.

The flow bumps the data version after each landed build and the runs version when a run ends,
and publishes each bump on `<prefix>:events` (`flows.cache`). The server subscribes once; on a
message (or, as a safety net if a message was missed while Redis was away, when a cheap GET of
both counters every `poll_s` shows a change) every connected page gets a `version` event and
fetches its own fresh contents, which come from the Redis cache after the first page. Viewers
never poll ClickHouse. Every `tick_s` pages also get a `tick`, so ages keep moving.

Bumps can come many times a second (the change-stream follower settles a micro-batch every
0.1 s under a steady writer): pages get at most one `version` event per `min_interval_s`
(`PIPELINE_WEB_LIVE_MIN_INTERVAL_SECONDS`), carrying the latest versions, so a busy source
costs each page's queries once per interval instead of once per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from flows.cache import events_channel
from loader.clients import connect_redis_async
from web.settings import WebSettings

logger = logging.getLogger("web.live")


class Broadcaster:
    def __init__(self, settings: WebSettings, poll_s: float = 5.0, tick_s: float | None = None):
        self.settings = settings
        self.poll_s = poll_s
        self.min_interval_s = settings.web_live_min_interval_seconds
        self._last_fan_out = float("-inf")  # time.monotonic() of the last version event
        self.tick_s = tick_s if tick_s is not None else settings.web_refresh_seconds
        self.versions: tuple[str, str] | None = None
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.connected = False

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="web-live-listener")
        self._ticker = asyncio.create_task(self._tick(), name="web-live-ticker")

    async def stop(self) -> None:
        for task in (self._task, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for queue in list(self._queues):
            queue.put_nowait({"event": "bye", "data": "{}"})

    # -- subscribers -------------------------------------------------------------------------------
    @property
    def viewers(self) -> int:
        return len(self._queues)

    def _version_event(self) -> dict[str, Any]:
        data, runs = self.versions or ("0", "0")
        return {"event": "version", "data": json.dumps({"data": data, "runs": runs})}

    def _fan_out(self, event: dict[str, Any]) -> None:
        for queue in list(self._queues):
            if queue.qsize() < 100:  # a stalled page misses events, it never holds memory
                queue.put_nowait(event)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The events of one page, from its connection until it goes away."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues.add(queue)
        try:
            yield {"retry": 2000, **self._version_event()}
            while True:
                event = await queue.get()
                if event.get("event") == "bye":
                    return
                yield event
        finally:
            self._queues.discard(queue)

    # -- the one listener --------------------------------------------------------------------------
    async def _read_versions(self, client: aioredis.Redis) -> tuple[str, str]:
        data, runs = await client.mget(
            self.settings.key("data_version"), self.settings.key("runs_version")
        )
        return (str(data or "0"), str(runs or "0"))  # str already: decode_responses=True

    async def _check(self, client: aioredis.Redis) -> None:
        versions = await self._read_versions(client)
        if versions == self.versions:
            return
        wait = self._last_fan_out + self.min_interval_s - time.monotonic()
        if wait > 0:  # too soon after the last event: send the latest versions at the end
            await asyncio.sleep(wait)
            versions = await self._read_versions(client)
        self.versions = versions
        self._last_fan_out = time.monotonic()
        self._fan_out(self._version_event())

    async def _listen(self) -> None:
        channel = events_channel(self.settings)
        while True:
            client = connect_redis_async(self.settings)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self.connected = True
                await self._check(client)
                while True:
                    await pubsub.get_message(timeout=self.poll_s)
                    # A message says "something changed"; the counters say what it is now.
                    await self._check(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: pages keep what they show; retry
                if self.connected:
                    logger.warning("live updates paused: Redis unavailable (%s)", exc)
                self.connected = False
                await asyncio.sleep(2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._fan_out({"event": "tick", "data": "{}"})
