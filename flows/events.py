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
                logger.error("Run triggered by change signals failed: %s", exc)
                backlog = True
                stop.wait(settings.task_retry_delay_seconds)
                continue
            client.xack(key, GROUP, *ids)
        except REDIS_ERRORS as exc:
            logger.warning("Change-signal stream unavailable (%s); retrying in 5 s", exc)
            client = None
            backlog = True
            stop.wait(5)


def watch_mongo(settings: FlowSettings, stop: threading.Event, logger: logging.Logger) -> None:
    """Follow MongoDB's change stream and signal every change of a synced collection.

    The resume token is kept in Redis next to the stream, so a restarted watcher neither misses
    nor repeats much; with an expired token it starts from now (the schedule covers the gap).
    """
    from pymongo import MongoClient
    from pymongo.errors import OperationFailure, PyMongoError

    from loader.settings import Settings

    loader_settings = Settings()
    token_key = settings.key("changes", "resume_token")
    pipeline = [{"$match": {"ns.coll": {"$in": list(settings.collections)}}}]
    while not stop.is_set():
        client = connect(settings)
        mongo = MongoClient(loader_settings.mongo_uri)
        try:
            token = client.get(token_key)
            resume = {"_data": token} if token else None
            db = mongo[loader_settings.mongo_db]
            with db.watch(pipeline, resume_after=resume, max_await_time_ms=1000) as stream:
                while not stop.is_set():
                    change = stream.try_next()
                    if change is None:
                        continue
                    signal_change(
                        client,
                        settings,
                        change["ns"]["coll"],
                        op=change["operationType"],
                        id=change.get("documentKey", {}).get("_id", ""),
                    )
                    client.set(token_key, change["_id"]["_data"])
        except OperationFailure as exc:
            logger.warning("Change stream cannot resume (%s); restarting from now", exc)
            client.delete(token_key)
        except (PyMongoError, *REDIS_ERRORS) as exc:
            logger.warning("Change watcher interrupted (%s); reconnecting in 5 s", exc)
            stop.wait(5)
        finally:
            mongo.close()
            client.close()
