"""Deletes: polling by watermark cannot see a document that is gone, so two ways find them.

- `follow_changes` follows the collection's change stream and turns delete events into
  tombstones; it stores the resume token in `ops.change_stream_state` after each processed
  batch of events, so a restart resumes where it stopped.
- `loader.reconcile` compares both sides by id and tombstones ids that are in ClickHouse but
  gone from Mongo (and repairs what else the watermark read missed).

A tombstone is a copy of the last stored row with `is_deleted = 1` and a higher `_version`
(`max(deleted_at_ms, last _version + 1)`), written by one `INSERT ... SELECT ... FINAL` with
server-side parameters, so the last known values stay in the table as history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bson import ObjectId, json_util
from pymongo.errors import OperationFailure

from loader.build_pending import mark_build_pending
from loader.clients import Clients, clickhouse_call, mongo_call, open_clients
from loader.idset import id_set
from loader.mapping import BatchMapper
from loader.runs import PeakRss, RunRecord, new_run_id
from loader.schema import (
    CHANGE_STREAM_STATE,
    raw_columns,
    raw_table,
    require_collection,
)
from loader.settings import Settings
from loader.sync import prepare_clients, store_rejects, store_rows, write_run_or_log
from loader.watermark import now_ms

log = logging.getLogger(__name__)

TOMBSTONE_CHUNK = 50_000  # ids per INSERT ... SELECT: bounded server memory
CHANGE_STREAM_HISTORY_LOST = 286  # the oplog starts after the stored position
INVALID_RESUME_TOKEN = 260
CHANGE_STREAM_FATAL = 280  # "the resume token was not found": its event is not in the oplog
CANNOT_RESUME = (CHANGE_STREAM_HISTORY_LOST, INVALID_RESUME_TOKEN, CHANGE_STREAM_FATAL)


# -- tombstones --------------------------------------------------------------------------------
def write_tombstones(
    clients: Clients, collection: str, deleted: dict[str, int], run_id: str
) -> int:
    """Tombstone every id in `deleted` (hex id → deletion time in ms) that has a live row.

    Ids without a live row (never loaded, or already tombstoned) are skipped, which makes
    replaying the same delete events harmless. The ids travel as an id set (request body), so
    any number works. Returns the number of tombstones written."""
    if not deleted:
        return 0
    table = raw_table(collection).qualified
    names = [n for n, _ in raw_columns(collection)]
    exprs = {
        "is_deleted": "toUInt8(1)",
        "_version": "greatest(live.prev_version + 1, deleted.value)",
        "_loaded_at": "now64(3, 'UTC')",
        "_run_id": "{run:String}",
    }
    select = ", ".join(f"{exprs[n]} AS `{n}`" if n in exprs else f"live.`{n}`" for n in names)
    cols = ", ".join(f"`{n}`" for n in names)
    written = 0
    ch = clients.clickhouse
    items = list(deleted.items())
    for start in range(0, len(items), TOMBSTONE_CHUNK):
        with id_set(clients, items[start : start + TOMBSTONE_CHUNK]) as ids:
            # The filter sits in a subquery: in ClickHouse a SELECT alias (`1 AS is_deleted`)
            # would shadow the column of the same name in a WHERE at the same level.
            live = (
                f"SELECT *, _version AS prev_version FROM {table} FINAL "
                f"WHERE _id IN {ids.keys()} AND is_deleted = 0"
            )
            count = f"SELECT count() FROM ({live})"
            insert = (
                f"INSERT INTO {table} ({cols}) SELECT {select} FROM ({live}) AS live "
                f"INNER JOIN {ids.pairs()} AS deleted ON live._id = deleted.key"
            )

            def go(count: str = count, insert: str = insert) -> int:
                n = int(ch.command(count))
                if n:
                    ch.command(insert, parameters={"run": run_id})
                return n

            written += clickhouse_call(clients.settings, go)
    return written


# -- change stream -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FollowResult:
    run_id: str
    collection: str
    events: int  # change events processed (only deletes unless all_changes)
    deletes: int  # tombstones written
    resumed: bool  # started from a stored resume token
    stopped_because: str


def load_resume_token(clients: Clients, collection: str) -> Any:
    rows = clickhouse_call(
        clients.settings,
        lambda: (
            clients.clickhouse.query(
                f"SELECT resume_token FROM {CHANGE_STREAM_STATE.qualified} "
                "WHERE collection = {c:String} ORDER BY saved_at DESC LIMIT 1",
                parameters={"c": collection},
            ).result_rows
        ),
    )
    if not rows or not rows[0][0]:
        return None
    return json_util.loads(rows[0][0])


def save_resume_token(clients: Clients, collection: str, token: Any, events: int) -> None:
    text = json_util.dumps(token, json_options=json_util.CANONICAL_JSON_OPTIONS) if token else ""
    clickhouse_call(
        clients.settings,
        lambda: clients.clickhouse.command(
            f"INSERT INTO {CHANGE_STREAM_STATE.qualified} "
            "(collection, resume_token, events, saved_at) "
            "SELECT {c:String}, {t:String}, {n:UInt64}, now64(6)",
            parameters={"c": collection, "t": text, "n": events},
        ),
    )


def _deleted_at_ms(change: dict[str, Any]) -> int:
    wall = change.get("wallTime")
    if wall is not None:
        return int(wall) if not hasattr(wall, "timestamp") else int(wall.timestamp() * 1000)
    cluster = change.get("clusterTime")
    return int(cluster.time) * 1000 if cluster is not None else now_ms()


def follow_changes(
    settings: Settings,
    collection: str,
    *,
    clients: Clients | None = None,
    max_events: int | None = None,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
    flush_every: int = 1_000,
    max_await_ms: int = 500,
    on_flush: Callable[[int, int], None] | None = None,
    all_changes: bool = False,
) -> FollowResult:
    """Follow `collection`'s change stream and tombstone deleted documents.

    With `all_changes`, inserts, updates and replacements are loaded too (the current document,
    mapped like `sync` maps it, rejects included), so the raw table follows Mongo within about
    a second; `sync` stays the authority for the watermark. Resumes from the token in
    `ops.change_stream_state` (from "now" on the first run). Stops after `max_events` events,
    after `idle_timeout_s` without any, when `stop` is set, or on Ctrl-C; runs forever
    otherwise. `on_flush(events, deletes)` reports progress.
    """
    require_collection(collection)
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        run_id = new_run_id()
        rec = RunRecord(run_id, collection, kind="watch")
        rss = PeakRss()
        ops = ("delete", "insert", "update", "replace") if all_changes else ("delete",)
        token = load_resume_token(cl, collection)
        resumed = token is not None
        coll = cl.db[collection]
        events = deletes = 0
        pending: dict[str, int] = {}
        mapper = BatchMapper(collection, settings.max_string_chars)
        mapped = 0
        marked_pending = False
        last_event = time.monotonic()
        saved_token = token
        why = "stopped"

        def flush(stream: Any) -> None:
            nonlocal deletes, saved_token, mapped, marked_pending
            if (mapped or pending) and not marked_pending:
                # Before the first write: the downstream models need a build.
                clickhouse_call(
                    settings, lambda: mark_build_pending(cl.clickhouse, collection, run_id)
                )
                marked_pending = True
            if mapped:
                batch = mapper.take()
                store_rows(cl, batch, run_id)
                store_rejects(cl, batch, run_id)
                rec.docs_read += mapped
                rec.rows_written += batch.rows
                rec.rejects += len(batch.rejects)
                mapped = 0
            if pending:
                deletes += write_tombstones(cl, collection, pending, run_id)
                pending.clear()
            current = stream.resume_token
            if current is not None and current != saved_token:
                save_resume_token(cl, collection, current, events)
                saved_token = current
            rss.sample()
            if on_flush:
                on_flush(events, deletes)

        try:
            stream = mongo_call(
                settings,
                lambda: coll.watch(
                    # `invalidate` too: a $match that leaves it out hides the drop of the
                    # collection, and the driver then fails resuming past it.
                    [{"$match": {"operationType": {"$in": [*ops, "invalidate"]}}}],
                    full_document="updateLookup" if all_changes else None,
                    resume_after=token,
                    max_await_time_ms=max_await_ms,
                    batch_size=flush_every,
                ),
            )
            with stream:
                while True:
                    change = mongo_call(settings, stream.try_next)
                    if change is not None:
                        last_event = time.monotonic()
                        if change.get("operationType") == "invalidate":
                            # The collection was dropped or renamed: this stream cannot resume.
                            # Forget the token so the next run starts from now; deletes before
                            # then are for `reconcile` (or a full refresh) to find.
                            why = "collection dropped or renamed: run reconcile"
                            flush(stream)
                            save_resume_token(cl, collection, None, events)
                            break
                        events += 1
                        if change.get("operationType") == "delete":
                            key = change.get("documentKey", {}).get("_id")
                            if isinstance(key, ObjectId):
                                pending[str(key)] = _deleted_at_ms(change)
                        elif isinstance(change.get("fullDocument"), dict):
                            # None when the document is gone by lookup time: its delete follows.
                            mapper.add(change["fullDocument"])
                            mapped += 1
                        if len(pending) + mapped < flush_every and (
                            max_events is None or events < max_events
                        ):
                            continue
                    flush(stream)
                    if max_events is not None and events >= max_events:
                        why = "max_events"
                        break
                    if stop is not None and stop.is_set():
                        why = "stop requested"
                        break
                    if (
                        idle_timeout_s is not None
                        and time.monotonic() - last_event >= idle_timeout_s
                    ):
                        why = "idle"
                        break
        except OperationFailure as exc:
            if exc.code in CANNOT_RESUME:
                rec.finish("failed", f"cannot resume change stream: {exc}")
                _record(cl, rec, events, deletes, rss)
                code = (exc.details or {}).get("codeName", exc.code)
                raise RuntimeError(
                    f"The change stream of {collection} cannot resume from the stored token "
                    f"({code}: the oplog no longer holds that position, or "
                    "the collection was dropped). Run `python -m loader reconcile` to catch up on "
                    "deletes, then `python -m loader watch --reset` to start from now."
                ) from exc
            rec.finish("failed", f"{type(exc).__name__}: {exc}")
            _record(cl, rec, events, deletes, rss)
            raise
        except KeyboardInterrupt:
            why = "interrupted"
        except BaseException as exc:
            rec.finish("failed", f"{type(exc).__name__}: {exc}")
            _record(cl, rec, events, deletes, rss)
            raise
        rec.finish("ok", f"watch: {why}; resumed={resumed}")
        _record(cl, rec, events, deletes, rss)
        return FollowResult(run_id, collection, events, deletes, resumed, why)


def reset_resume_token(
    settings: Settings, collection: str, *, clients: Clients | None = None
) -> None:
    """Forget the stored position: the next `follow_changes` starts from now."""
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        save_resume_token(cl, collection, None, 0)


def _record(cl: Clients, rec: RunRecord, events: int, deletes: int, rss: PeakRss) -> None:
    rec.deletes = deletes
    rec.peak_rss_bytes = rss.peak
    rec.message = f"{rec.message}; events={events}".lstrip("; ")
    write_run_or_log(cl, rec)
