"""Event-driven runs: change signals in a Redis stream, and a runner that waits on it.

Signals are durable: a Redis stream (XADD) read through a consumer group, so a signal written
while no runner is listening, or while a run is in progress, stays pending until a run that
started after it has finished and acknowledged it. (Pub/sub would drop it.) One run serves every
signal that arrived before it started; signals are coalesced, never queued one run each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import redis

from flows.redis_link import REDIS_ERRORS
from flows.settings import FlowSettings

GROUP = "sync-runners"
# The stream only needs recent signals: a run covers everything older anyway.
STREAM_MAXLEN = 10_000
# Longest pause between retries of a failing signalled run (the schedule keeps running anyway).
MAX_BACKOFF_SECONDS = 300.0


def stream_key(settings: FlowSettings) -> str:
    return settings.key("changes")


def connect(settings: FlowSettings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def signal_change(client: redis.Redis, settings: FlowSettings, collection: str, **info: Any) -> str:
    """Record that `collection` changed; returns the stream entry id."""
    fields = {"collection": collection, **{k: str(v) for k, v in info.items()}}
    return client.xadd(stream_key(settings), fields, maxlen=STREAM_MAXLEN, approximate=True)


def _ensure_group(client: redis.Redis, key: str) -> None:
    try:
        # "0": a new group also sees signals written before any runner existed.
        client.xgroup_create(key, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _entries(reply: Iterable[Any]) -> list[tuple[str, dict[str, str]]]:
    return [entry for _stream, entries in reply or [] for entry in entries if entry[1]]


def run_on_signals(
    settings: FlowSettings,
    run: Callable[[list[dict[str, str]]], Any],
    stop: threading.Event,
    logger: logging.Logger,
    consumer: str = "runner",
    block_ms: int = 2000,
) -> None:
    """Call `run(signals)` whenever signals arrive, until `stop` is set.

    Pending signals (read by an earlier runner that died before acknowledging them) are served
    first. A failed run leaves its signals pending, so the next loop retries them. With Redis
    down the loop waits and reconnects; the schedule still covers the gap.
    """
    key = stream_key(settings)
    client: redis.Redis | None = None
    backlog = True  # first serve entries delivered to this consumer but never acknowledged
    failures = 0  # consecutive failed runs: back off so a broken build is not retried in a loop
    while not stop.is_set():
        try:
            if client is None:
                client = connect(settings)
                _ensure_group(client, key)
            reply = client.xreadgroup(
                GROUP,
                consumer,
                {key: "0" if backlog else ">"},
                count=1000,
                block=None if backlog else block_ms,
            )
            entries = _entries(reply)
            if backlog and not entries:
                backlog = False
                continue
            if not entries:
                continue
            # Drain everything already waiting: one run serves them all.
            while more := _entries(client.xreadgroup(GROUP, consumer, {key: ">"}, count=1000)):
                entries += more
            ids = [entry_id for entry_id, _ in entries]
            signals = [fields for _, fields in entries]
            logger.info("%d change signal(s) received; starting a sync run", len(signals))
            try:
                run(signals)
            except Exception as exc:  # the signals stay pending and are retried
                delay = min(settings.task_retry_delay_seconds * 2**failures, MAX_BACKOFF_SECONDS)
                failures += 1
                logger.error(
                    "Run triggered by change signals failed (%s); retrying in %.0f s", exc, delay
                )
                backlog = True
                stop.wait(delay)
                continue
            failures = 0
            client.xack(key, GROUP, *ids)
        except REDIS_ERRORS as exc:
            logger.warning("Change-signal stream unavailable (%s); retrying in 5 s", exc)
            client = None
            backlog = True
            stop.wait(5)


def follow_and_signal(
    settings: FlowSettings, collection: str, stop: threading.Event, logger: logging.Logger
) -> None:
    """Run the loader's change-stream follower on `collection`: the hot path.

    The follower (`loader.follower.follow_changes`, all changes) stores changed documents and
    tombstones in `raw` every `LOADER_FLUSH_INTERVAL_MS` (0.1 s) and, for `tasks`, settles them
    into `analytics.pipeline_state_store`, which the dashboard reads live: no dbt build and no
    Prefect run per change. After each stored batch this bumps the dashboard cache's data
    version, so the next page load reads the new state. A batch the hot path could not carry
    to the dashboard on its own (an `employee` change: names come from `dim_employees`; or no
    store yet, before the first build) XADDs a change signal instead, which starts a flow run
    when `--events` listens. Every write also marks its build pending in `ops.build_pending`
    (durable): the scheduled runs build the marts and run the tests.
    """
    from flows.cache import QueryCache
    from flows.redis_link import RedisLink
    from loader.follower import StoredBatch, follow_changes
    from loader.settings import Settings

    client = connect(settings)
    cache = QueryCache(settings, RedisLink(settings, logger))

    def on_stored(batch: StoredBatch) -> None:
        if batch.settled is not None:
            cache.bump_version()
            return
        try:
            signal_change(client, settings, collection, events=batch.events, deletes=batch.deletes)
        except REDIS_ERRORS as exc:  # the pending flag is durable; the schedule picks it up
            logger.warning("Could not signal a change of %s (%s)", collection, exc)

    try:
        while not stop.is_set():
            try:
                follow_changes(
                    Settings(), collection, stop=stop, on_stored=on_stored, all_changes=True
                )
            except Exception as exc:  # keep following; the schedule covers the gap
                logger.error(
                    "Change follower of %s stopped (%s); restarting in 10 s", collection, exc
                )
                stop.wait(10)
    finally:
        client.close()
