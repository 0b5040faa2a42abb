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
from contextlib import closing
from typing import Any

import redis
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from flows.redis_link import REDIS_ERRORS
from flows.settings import FlowSettings
from loader.clients import connect_redis

GROUP = "sync-runners"
# The stream only needs recent signals: a run covers everything older anyway.
STREAM_MAXLEN = 10_000
# Longest pause between retries of a failing signalled run (the schedule keeps running anyway).
MAX_BACKOFF_SECONDS = 300.0
REDIS_RETRY_SECONDS = 5.0  # pause before reconnecting to a Redis that failed


def stream_key(settings: FlowSettings) -> str:
    return settings.key("changes")


def connect(settings: FlowSettings) -> redis.Redis:
    return connect_redis(settings, blocking_reads=True)  # XREADGROUP blocks for a signal


def signal_change(client: redis.Redis, settings: FlowSettings, collection: str, **info: Any) -> str:
    """Record that `collection` changed; returns the stream entry id."""
    fields: dict[str | bytes | int | float, str | bytes | int | float] = {
        "collection": collection,
        **{k: str(v) for k, v in info.items()},
    }
    entry_id = client.xadd(stream_key(settings), fields, maxlen=STREAM_MAXLEN, approximate=True)
    return str(entry_id)  # str already: the client decodes responses


def _ensure_group(client: redis.Redis, key: str) -> None:
    try:
        # "0": a new group also sees signals written before any runner existed.
        client.xgroup_create(key, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _entries(reply: Iterable[Any]) -> list[tuple[str, dict[str, str]]]:
    return [entry for _stream, entries in reply or [] for entry in entries if entry[1]]


class SignalledRunFailed(Exception):
    """A run started by change signals failed; its signals stay pending."""


class _SignalReader:
    """Reads this consumer's signals: first those delivered before but never acknowledged (a
    runner that died, or a run that failed), then new ones."""

    def __init__(self, settings: FlowSettings, consumer: str, block_ms: int) -> None:
        self.settings = settings
        self.key = stream_key(settings)
        self.consumer = consumer
        self.block_ms = block_ms
        self.client: redis.Redis | None = None
        self.backlog = True

    def read(self) -> list[tuple[str, dict[str, str]]]:
        """What is waiting now (the backlog first); [] after `block_ms` without a signal."""
        if self.client is None:
            self.client = connect(self.settings)
            _ensure_group(self.client, self.key)
        client = self.client
        reply = client.xreadgroup(
            GROUP,
            self.consumer,
            {self.key: "0" if self.backlog else ">"},
            count=1000,
            block=None if self.backlog else self.block_ms,
        )
        entries = _entries(reply)
        if self.backlog and not entries:
            self.backlog = False
            return self.read()
        if entries:
            # Drain everything already waiting: one run serves them all.
            while more := _entries(
                client.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=1000)
            ):
                entries += more
        return entries

    def ack(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        assert self.client is not None
        self.client.xack(self.key, GROUP, *[entry_id for entry_id, _ in entries])

    def reset(self) -> None:
        """After an error: reconnect, and read the unacknowledged signals again first."""
        self.client = None
        self.backlog = True


# What a round of the runner retries: a failed run (its signals stay pending) or Redis down.
RETRIED: tuple[type[BaseException], ...] = (SignalledRunFailed, *REDIS_ERRORS)


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
    first. A failed run leaves its signals pending; they are served again after a pause that
    doubles with each failure in a row (tenacity, as every retry of the loader), so a broken
    build is not retried in a loop. With Redis down the loop waits and reconnects; the schedule
    still covers the gap.
    """
    reader = _SignalReader(settings, consumer, block_ms)
    backoff = wait_exponential(
        multiplier=settings.task_retry_delay_seconds, max=MAX_BACKOFF_SECONDS
    )

    def serve() -> None:
        if stop.is_set():
            return
        try:
            entries = reader.read()
            if not entries:
                return
            signals = [fields for _, fields in entries]
            logger.info("%d change signal(s) received; starting a sync run", len(signals))
            try:
                run(signals)
            except Exception as exc:  # the signals stay pending and are retried
                raise SignalledRunFailed(f"{type(exc).__name__}: {exc}") from exc
            reader.ack(entries)
        except RETRIED:
            reader.reset()
            raise

    def wait(state: RetryCallState) -> float:
        failed = state.outcome and state.outcome.exception()
        return REDIS_RETRY_SECONDS if isinstance(failed, REDIS_ERRORS) else backoff(state)

    def log_retry(state: RetryCallState) -> None:
        failed = state.outcome and state.outcome.exception()
        if isinstance(failed, REDIS_ERRORS):
            logger.warning(
                "Change-signal stream unavailable (%s); retrying in %.0f s",
                failed,
                state.upcoming_sleep,
            )
        else:
            logger.error(
                "Run triggered by change signals failed (%s); retrying in %.0f s",
                failed,
                state.upcoming_sleep,
            )

    def pause(seconds: float) -> None:
        stop.wait(seconds)  # a stop request ends the pause at once

    # Failures in a row share one count, so the pause after a failed run grows until a round
    # goes through (a new `retry(serve)` starts the count again).
    retry = Retrying(
        retry=retry_if_exception_type(RETRIED),
        wait=wait,
        stop=lambda _state: stop.is_set(),  # no limit: the signals wait for a run that works
        sleep=pause,
        before_sleep=log_retry,
        reraise=True,
    )
    while not stop.is_set():
        try:
            retry(serve)
        except RETRIED:
            return  # stopped; unacknowledged signals wait for the next runner


def follow_and_signal(
    settings: FlowSettings, collection: str, stop: threading.Event, logger: logging.Logger
) -> None:
    """Run the loader's change-stream follower on `collection`: the hot path.

    The follower (`loader.follower.follow_changes`, all changes) stores changed documents and
    tombstones in `raw` every `LOADER_FLUSH_INTERVAL_MS` (0.1 s) and, for `tasks`, settles them
    into `analytics.pipeline_state_store`, which the dashboard reads live: no dbt build and no
    Prefect run per change. After each stored batch this bumps the dashboard cache's data
    version, so the next page load reads the new state. A batch the hot path could not carry
    to the dashboard on its own (an `employee` change: names come from `mart_employees`; or no
    store yet, before the first build) XADDs a change signal instead, which starts a flow run
    when `--events` listens. Every write also marks its build pending in `ops.build_pending`
    (durable): the scheduled runs build the marts and run the tests.
    """
    from flows.cache import settled_batch_refresher
    from loader.follower import StoredBatch, follow_changes
    from loader.settings import Settings

    def on_stored(batch: StoredBatch) -> None:
        if refresh_dashboard(batch):
            return
        try:
            signal_change(client, settings, collection, events=batch.events, deletes=batch.deletes)
        except REDIS_ERRORS as exc:  # the pending flag is durable; the schedule picks it up
            logger.warning("Could not signal a change of %s (%s)", collection, exc)

    with (
        closing(connect(settings)) as client,
        settled_batch_refresher(settings, logger) as refresh_dashboard,
    ):
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
