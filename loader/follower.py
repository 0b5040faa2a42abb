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
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId, json_util
from pymongo.errors import OperationFailure

from loader.build_pending import mark_build_pending
from loader.clients import (
    Clients,
    clickhouse_call,
    connect_clickhouse,
    mongo_call,
    open_clients,
)
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
from loader.state import Settled, TaskVersions, settle
from loader.sync import prepare_clients, store_rejects, store_rows, write_run_or_log
from loader.watermark import now_ms

log = logging.getLogger(__name__)

TOMBSTONE_CHUNK = 50_000  # ids per INSERT ... SELECT: bounded server memory
FEW_TOMBSTONES = 2_000  # up to this many ids: one lookup by primary key and one insert
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
    if len(deleted) <= FEW_TOMBSTONES:
        return _write_few_tombstones(clients, collection, deleted, run_id)
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


def _write_few_tombstones(
    clients: Clients, collection: str, deleted: dict[str, int], run_id: str
) -> int:
    """`write_tombstones` for a change-stream batch: the latest row of each id by primary key
    (the ids as a query parameter; no FINAL, which merges every part of the table), then one
    insert of the tombstones built from them. Same rows as the INSERT ... SELECT path."""
    table = raw_table(collection).qualified
    names = [n for n, _ in raw_columns(collection)]
    cols = ", ".join(f"`{n}`" for n in names)
    ch = clients.clickhouse
    latest = (
        f"SELECT {cols} FROM (SELECT {cols} FROM {table} WHERE _id IN {{ids:Array(String)}} "
        "ORDER BY _id, _version DESC LIMIT 1 BY _id) WHERE is_deleted = 0"
    )
    live = clickhouse_call(
        clients.settings,
        lambda: ch.query(latest, parameters={"ids": list(deleted)}).result_rows,
    )
    if not live:
        return 0
    at = {n: i for i, n in enumerate(names)}
    loaded_at = datetime.fromtimestamp(now_ms() / 1000, UTC)
    rows = []
    for row in live:
        tomb = list(row)
        tomb[at["is_deleted"]] = 1
        tomb[at["_version"]] = max(int(row[at["_version"]]) + 1, deleted[row[at["_id"]]])
        tomb[at["_loaded_at"]] = loaded_at
        tomb[at["_run_id"]] = run_id
        rows.append(tomb)
    clickhouse_call(clients.settings, lambda: ch.insert(table, rows, column_names=names))
    return len(rows)


# -- change stream -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FollowResult:
    run_id: str
    collection: str
    events: int  # change events processed (only deletes unless all_changes)
    deletes: int  # tombstones written
    resumed: bool  # started from a stored resume token
    stopped_because: str
    batches: int = 0  # batches stored (with something in them)
    settled_files: int = 0  # file states recomputed in the hot path (retractions)


@dataclass(frozen=True)
class StoredBatch:
    """What one flush stored, for `on_stored`: the hot path's progress report."""

    collection: str
    events: int  # events in this batch (before de-duplication by _id)
    rows: int  # rows written to raw
    deletes: int  # tombstones written
    settled: Settled | None  # None: pipeline_state is not maintained here (no store yet)
    lag_seconds: float  # now - commit time of the batch's last event
    stored_at: float  # time.time() when the batch was stored and settled


@dataclass
class _Pending:
    """A flush handed to the settler: a stored batch, or only a stream position (idle)."""

    versions: TaskVersions | None  # the stored task versions to settle (tasks only)
    token: Any  # the stream position after this flush
    events: int  # events processed so far
    stored: bool
    buffered: int  # events in the batch
    rows: int
    deletes: int
    last_event_ms: int | None
    final: bool = False


class _Settler:
    """Settles stored batches and saves the stream position, in a thread of its own.

    The follower's thread stores batch after batch; this one takes whatever has been stored
    since it last looked, settles it in one go (`loader.state.settle`, over its own ClickHouse
    connection), then saves the resume token of the last of them, so the saved position never
    passes a batch that is not settled: a crash replays at most the unsettled batches, and
    settling them again is harmless. The position is saved at most every `save_every_s` while
    batches keep coming, every `heartbeat_s` while idle, and at once for a final flush. The
    first error stops all further work (nothing more is saved) and is raised in the follower's
    thread at its next flush."""

    def __init__(
        self,
        clients: Clients,
        collection: str,
        token: Any,
        *,
        on_stored: Callable[[StoredBatch], None] | None,
        save_every_s: float,
        heartbeat_s: float,
    ) -> None:
        self.clients = clients
        self.collection = collection
        self.on_stored = on_stored
        self.save_every_s = save_every_s
        self.heartbeat_s = heartbeat_s
        self.saved_token = token
        self.saved_at = 0.0
        self.unsaved_lag: float | None = None  # lag of a settled batch whose position is unsaved
        self.batches = 0
        self.settled_files = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"settle-{collection}", daemon=True)
        self._own: Clients | None = None
        self._inflight = 0  # stored batches handed over and not settled yet
        self._settled = threading.Condition()

    def start(self) -> None:
        self._thread.start()

    def put(self, item: _Pending) -> None:
        if item.stored:
            with self._settled:
                self._inflight += 1
        self._queue.put(item)

    def wait_for_room(self) -> None:
        """Block while a stored batch is still settling and another one waits behind it: the
        next batch is stored while the last one settles, no further ahead. On an engine that
        runs one statement at a time (the embedded stack) a deeper queue only interleaves more,
        smaller batches; waiting lets the buffered batch grow instead."""
        with self._settled:
            self._settled.wait_for(lambda: self._inflight <= 1 or self.error is not None)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        """Wait until everything handed over is settled and its position saved."""
        self._queue.join()
        self.check()

    def stop(self) -> None:
        """Finish what was handed over, then end the thread (never raises)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _clients(self) -> Clients:
        if self._own is None:
            cl = self.clients
            self._own = Clients(cl.settings, cl.mongo, connect_clickhouse(cl.settings))
        return self._own

    def _run(self) -> None:
        try:
            while True:
                items = [self._queue.get()]
                while True:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                work = [i for i in items if i is not None]
                try:
                    if work and self.error is None:
                        self._settle(work)
                except BaseException as exc:  # noqa: BLE001 - raised in the follower's thread
                    self.error = exc
                finally:
                    with self._settled:
                        self._inflight -= sum(1 for i in work if i.stored)
                        self._settled.notify_all()
                    for _ in items:
                        self._queue.task_done()
                if len(work) < len(items):
                    return
        finally:
            if self._own is not None:
                self._own.clickhouse.close()

    def _settle(self, items: list[_Pending]) -> None:
        stored = [i for i in items if i.stored]
        settled = None
        if any(i.versions is not None for i in stored):
            merged = TaskVersions()
            for i in stored:
                if i.versions is not None:
                    merged.merge(i.versions)
            settled = settle(self._clients(), merged)
            if settled is not None:
                self.settled_files += settled.files
        now = time.time()
        lags = {
            id(i): max(0.0, now - i.last_event_ms / 1000) if i.last_event_ms is not None else 0.0
            for i in stored
        }
        if stored:
            self.unsaved_lag = lags[id(stored[-1])]
        last = items[-1]
        final = any(i.final for i in items)
        mono = time.monotonic()
        wait = self.save_every_s if stored else self.heartbeat_s
        if (
            last.token is not None
            and last.token != self.saved_token
            and (final or mono - self.saved_at >= wait)
        ):
            save_resume_token(
                self._clients(),
                self.collection,
                last.token,
                last.events,
                lag_seconds=self.unsaved_lag or 0.0,
                last_event_ms=last.last_event_ms,
            )
            self.saved_token = last.token
            self.saved_at = mono
            self.unsaved_lag = None
        for i in stored:
            self.batches += 1
            if self.on_stored is not None:
                self.on_stored(
                    StoredBatch(
                        self.collection,
                        i.buffered,
                        i.rows,
                        i.deletes,
                        settled,
                        lags[id(i)],
                        time.time(),
                    )
                )


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


def save_resume_token(
    clients: Clients,
    collection: str,
    token: Any,
    events: int,
    *,
    lag_seconds: float = 0.0,
    last_event_ms: int | None = None,
) -> None:
    text = json_util.dumps(token, json_options=json_util.CANONICAL_JSON_OPTIONS) if token else ""
    clickhouse_call(
        clients.settings,
        lambda: clients.clickhouse.command(
            f"INSERT INTO {CHANGE_STREAM_STATE.qualified} "
            "(collection, resume_token, events, saved_at, lag_seconds, last_event_at) "
            "SELECT {c:String}, {t:String}, {n:UInt64}, now64(6), {lag:Float64}, "
            "if({last:Int64} < 0, NULL, fromUnixTimestamp64Milli({last:Int64}, 'UTC'))",
            parameters={
                "c": collection,
                "t": text,
                "n": events,
                "lag": max(0.0, lag_seconds),
                "last": -1 if last_event_ms is None else last_event_ms,
            },
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
    flush_interval_s: float | None = None,
    max_await_ms: int | None = None,
    on_flush: Callable[[int, int], None] | None = None,
    on_stored: Callable[[StoredBatch], None] | None = None,
    all_changes: bool = False,
    heartbeat_s: float = 1.0,
    save_every_s: float = 0.5,
    after_store: Callable[[], None] | None = None,
) -> FollowResult:
    """Follow `collection`'s change stream and tombstone deleted documents.

    With `all_changes`, inserts, updates and replacements are loaded too (the current document,
    mapped like `sync` maps it, rejects included), so the raw table follows Mongo within a
    fraction of a second; `sync` stays the authority for the watermark. This is the hot path:
    events are buffered (the last event per `_id` wins) and stored as one batch at most
    `flush_interval_s` (LOADER_FLUSH_INTERVAL_MS, 0.1 s) after the first of them, or at
    `flush_every` events; for `tasks`, each stored batch is then settled into
    `analytics.pipeline_state_store` (`loader.state.settle`) by a thread of its own (`_Settler`)
    while the next batch is stored (one batch settling at a time, one stored ahead of it). The
    resume token is saved in `ops.change_stream_state`, with the follower's lag, only after the
    batch is stored and settled, so a crash replays the batch (raw dedupes it, settling is
    idempotent). Resumes from
    the stored token (from "now" on the first run). Stops after `max_events` events, after
    `idle_timeout_s` without any, when `stop` is set, or on Ctrl-C; runs forever otherwise.
    `on_flush(events, deletes)` reports progress after every flush (idle ones included);
    `on_stored(StoredBatch)` after each batch that stored something has been settled (from the
    settling thread). `after_store` runs between storing a batch and handing it over for
    settling (tests inject crashes there).
    """
    require_collection(collection)
    interval = settings.flush_interval_ms / 1000 if flush_interval_s is None else flush_interval_s
    await_ms = max(1, int(interval * 1000)) if max_await_ms is None else max_await_ms
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
        # The batch being buffered: the last full document or delete per _id (a later event of
        # the same document replaces an earlier one), and when its first event arrived.
        docs: dict[Any, dict[str, Any]] = {}
        pending: dict[str, int] = {}
        buffered = 0
        first_at: float | None = None
        last_event_ms: int | None = None
        mapper = BatchMapper(collection, settings.max_string_chars)
        marked_pending = False
        last_event = time.monotonic()
        why = "stopped"

        # Settling and saving the position run in a thread of their own (`_Settler`, with its
        # own ClickHouse connection), so the next batch is stored while the last one settles:
        # a new task, a status change or a reassignment shows in pipeline_state as soon as its
        # batch is stored, a retraction once its batch is settled.
        settler = _Settler(
            cl,
            collection,
            token,
            on_stored=on_stored,
            save_every_s=save_every_s,
            heartbeat_s=heartbeat_s,
        )

        def flush(stream: Any, final: bool = False) -> None:
            nonlocal deletes, marked_pending, buffered, first_at
            stored = bool(docs or pending)
            if stored:
                settler.wait_for_room()
            settler.check()
            if stored and (not marked_pending or pending):
                # Before the first write: the downstream models need a build. Again before a
                # batch with deletes: a build may have cleared the mark meanwhile, and a delete
                # is invisible to the watermark, so no scheduled run would load it (a changed
                # document is: the next run's sync reads it again and marks it).
                clickhouse_call(
                    settings, lambda: mark_build_pending(cl.clickhouse, collection, run_id)
                )
                marked_pending = True
            versions = TaskVersions()
            written = tombstoned = 0
            if docs:
                for doc in docs.values():
                    mapper.add(doc)
                batch = mapper.take()
                store_rows(cl, batch, run_id)
                store_rejects(cl, batch, run_id)
                rec.docs_read += len(docs)
                rec.rows_written += batch.rows
                rec.rejects += len(batch.rejects)
                written = batch.rows
                if collection == "tasks":
                    versions.add_batch(batch)
                docs.clear()
            if pending:
                tombstoned = write_tombstones(cl, collection, pending, run_id)
                deletes += tombstoned
                versions.add_deleted(pending)
                pending.clear()
            if stored and after_store is not None:
                after_store()
            rss.sample()
            settler.put(
                _Pending(
                    versions if stored and collection == "tasks" else None,
                    stream.resume_token,
                    events,
                    stored,
                    buffered,
                    written,
                    tombstoned,
                    last_event_ms,
                    final,
                )
            )
            if final:
                settler.drain()  # settled and the position saved before leaving
            buffered = 0
            first_at = None
            if on_flush:
                on_flush(events, deletes)

        settler.start()
        try:
            stream = mongo_call(
                settings,
                lambda: coll.watch(
                    # `invalidate` too: a $match that leaves it out hides the drop of the
                    # collection, and the driver then fails resuming past it.
                    [{"$match": {"operationType": {"$in": [*ops, "invalidate"]}}}],
                    full_document="updateLookup" if all_changes else None,
                    resume_after=token,
                    max_await_time_ms=await_ms,
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
                            flush(stream, final=True)
                            save_resume_token(cl, collection, None, events)
                            break
                        events += 1
                        buffered += 1
                        if first_at is None:
                            first_at = last_event
                        last_event_ms = _deleted_at_ms(change)
                        key = change.get("documentKey", {}).get("_id")
                        if change.get("operationType") == "delete":
                            if isinstance(key, ObjectId):
                                pending[str(key)] = last_event_ms
                                docs.pop(key, None)
                        elif isinstance(change.get("fullDocument"), dict):
                            # None when the document is gone by lookup time: its delete follows.
                            docs[key] = change["fullDocument"]
                            if isinstance(key, ObjectId):
                                pending.pop(str(key), None)
                        if (
                            len(pending) + len(docs) < flush_every
                            and last_event - first_at < interval
                            and (max_events is None or events < max_events)
                        ):
                            continue
                    leaving = ""
                    if max_events is not None and events >= max_events:
                        leaving = "max_events"
                    elif stop is not None and stop.is_set():
                        leaving = "stop requested"
                    elif (
                        idle_timeout_s is not None
                        and time.monotonic() - last_event >= idle_timeout_s
                    ):
                        leaving = "idle"
                    flush(stream, final=bool(leaving))  # leaving: save the position now
                    if leaving:
                        why = leaving
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
        finally:
            settler.stop()
        rec.finish("ok", f"watch: {why}; resumed={resumed}; batches={settler.batches}")
        _record(cl, rec, events, deletes, rss)
        return FollowResult(
            run_id,
            collection,
            events,
            deletes,
            resumed,
            why,
            settler.batches,
            settler.settled_files,
        )


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
