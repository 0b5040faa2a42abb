"""The change-stream follower: MongoDB's changes into `raw`, as they happen.

Polling by watermark cannot see a document that is gone, and runs only now and then. The
follower reads the collection's change stream: delete events become tombstones, and with
`all_changes` inserts, updates and replacements are loaded too (the hot path), in micro-batches
every LOADER_FLUSH_INTERVAL_MS. It saves the stream's resume token in `ops.change_stream_state`
only after the batch before it is stored (and, for `tasks`, settled into
`analytics.pipeline_state_store`), so a restart resumes where it stopped and replays at most the
batches that were not finished. `loader.reconcile` finds what the follower missed (deletes
while it was not running) by comparing both sides by id. The writes are `loader.store`'s.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bson import ObjectId
from clickhouse_connect.driver.client import Client
from pymongo.change_stream import ChangeStream
from pymongo.errors import OperationFailure

from loader.build_pending import mark_build_pending
from loader.clients import (
    Clients,
    clickhouse_call,
    mongo_call,
    open_clients,
)
from loader.identity import check_followable
from loader.mapping import BatchMapper, id_to_str
from loader.runs import PeakRss, RunKind, RunRecord, RunStatus, new_run_id
from loader.schema import CHANGE_STREAM_STATE, require_collection
from loader.settings import Settings
from loader.state import RetractingTasks, Settled, ViewTexts, settle
from loader.steps import Steps
from loader.store import (
    FEW_TOMBSTONES,
    insert_tombstones,
    load_resume_token,
    save_resume_token,
    store_rejects,
    store_rows,
    tombstone_rows,
    write_run_or_log,
    write_tombstones,
)
from loader.sync import prepare_clients
from loader.watermark import now_ms

log = logging.getLogger(__name__)
T = TypeVar("T")

CHANGE_STREAM_HISTORY_LOST = 286  # the oplog starts after the stored position
INVALID_RESUME_TOKEN = 260
CHANGE_STREAM_FATAL = 280  # "the resume token was not found": its event is not in the oplog
CANNOT_RESUME = (CHANGE_STREAM_HISTORY_LOST, INVALID_RESUME_TOKEN, CHANGE_STREAM_FATAL)
INVALIDATED = "collection dropped or renamed: run reconcile"
# An idle follower re-saves its position this often (its `saved_at` is its heartbeat).
ALIVE_EVERY_S = 5.0
# Silent for this long: the follower is not running (several missed idle saves, and more than
# a slow batch takes to store and settle on the embedded stack).
SILENT_AFTER_S = 6 * ALIVE_EVERY_S
# Stored batches that may wait for the settler before the follower stops storing more.
MAX_UNSETTLED = 8


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
    steps: Steps = field(default_factory=Steps)  # ms per step of storing it (the debug log)


@dataclass
class _Pending:
    """A flush handed to the settler: a stored batch, or only a stream position (idle)."""

    retracting: RetractingTasks | None  # the stored tasks that may retract (tasks only)
    token: Any  # the stream position after this flush
    events: int  # events processed so far
    stored: bool
    buffered: int  # events in the batch
    rows: int
    deletes: int
    last_event_ms: int | None
    final: bool = False
    steps: Steps = field(default_factory=Steps)  # storing it: waiting for room, each write
    handed_at: float = field(default_factory=time.monotonic)  # when the settler got it


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
        alive_every_s: float,
        max_unsettled: int = MAX_UNSETTLED,
        before_settle: Callable[[], None] | None = None,
    ) -> None:
        self.clients = clients
        self.max_unsettled = max_unsettled
        self.before_settle = before_settle
        self.collection = collection
        self.on_stored = on_stored
        self.save_every_s = save_every_s
        self.heartbeat_s = heartbeat_s
        self.alive_every_s = alive_every_s
        self.saved_token = token
        self.saved_at = 0.0
        self.unsaved_lag: float | None = None  # lag of a settled batch whose position is unsaved
        self.batches = 0
        self.settled_files = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"settle-{collection}", daemon=True)
        self._own: Clients | None = None
        self.views = ViewTexts()  # the settle's SQL, read once per VIEW_TEXT_TTL_S
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
        """Block while `max_unsettled` stored batches wait to be settled. The follower stores
        batch after batch while a settle runs (the server runs the two connections' statements
        side by side): a new task, a status change or a reassignment is in pipeline_state once
        its batch is stored, so it must not wait behind the settle of a retraction before it.
        The settler takes all the batches stored meanwhile in one go; the bound only keeps a
        settler that falls behind from holding more than that many batches in memory."""
        with self._settled:
            self._settled.wait_for(
                lambda: self._inflight < self.max_unsettled or self.error is not None
            )

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
            self._own = self.clients.with_own_clickhouse()
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
        started = time.monotonic()
        stored = [i for i in items if i.stored]
        settled = None
        group = Steps()  # this settle's steps and the position's save (the debug log)
        if stored and self.before_settle is not None:  # tests hold the settle here
            self.before_settle()
        if any(i.retracting is not None for i in stored):
            merged = RetractingTasks()
            for i in stored:
                if i.retracting is not None:
                    merged.merge(i.retracting)
            settled = settle(self._clients(), merged, self.views)
            if settled is not None:
                self.settled_files += settled.files
                group.update(settled.steps)
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
        moved = last.token != self.saved_token
        # An idle follower saves its unchanged position now and then too: a recent `saved_at`
        # tells the dashboard "running, nothing to do" apart from "stopped".
        alive = not stored and mono - self.saved_at >= self.alive_every_s
        if last.token is not None and (
            (moved and (final or mono - self.saved_at >= wait)) or alive
        ):
            with group.time("save"):
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
            log.info(
                "batch of %d events: %d rows, %d tombstones, %d files settled; store: %s; "
                "queued=%.0f settle: %s",
                i.buffered,
                i.rows,
                i.deletes,
                settled.files if settled else 0,
                i.steps.line(),
                (started - i.handed_at) * 1000,
                group.line() or "-",
            )
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
                        i.steps,
                    )
                )


class _Side:
    """A thread pool and ClickHouse connection of the follower's own for the statements of a
    batch that need not wait for its rows to be written: the re-mark of a batch with deletes,
    the lookup of its tombstones. They run while the rows are inserted."""

    def __init__(self, clients: Clients) -> None:
        self.clients = clients
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="follower-side")
        self._lock = threading.Lock()
        self._own: Clients | None = None

    def submit(self, fn: Callable[[Clients], T]) -> Future[T]:
        return self._pool.submit(lambda: fn(self._connected()))

    def _connected(self) -> Clients:
        with self._lock:
            if self._own is None:
                self._own = self.clients.with_own_clickhouse()
            return self._own

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._own is not None:
            self._own.clickhouse.close()


def _deleted_at_ms(change: dict[str, Any]) -> int:
    wall = change.get("wallTime")
    if wall is not None:
        return int(wall) if not hasattr(wall, "timestamp") else int(wall.timestamp() * 1000)
    cluster = change.get("clusterTime")
    return int(cluster.time) * 1000 if cluster is not None else now_ms()


# The fields that place a task version among its file's candidates besides its id and
# version: a change to them can leave an earlier candidate of the task outranking or elsewhere.
PLACING_FIELDS = ("file_id", "assigned_at")


def _may_retract(change: dict[str, Any]) -> bool:
    """Whether the event may leave a store row of its document that its new version does
    not outrank in the same file (`loader.state.settle` must recompute its files).

    Not for an insert: a new document has no earlier version, and an `_id` inserted again
    after a delete is checked through the delete (the delete's event marks the id in the
    same micro-batch, and a delete in an earlier batch is settled before this one or together
    with it, which recomputes its files from raw).
    Not for an update that sets or removes neither `file_id` nor `assigned_at` (a status
    change, a reassignment): the new version is a candidate of the same file with the same
    `assigned_at`, so it outranks every earlier version of the task there unless its
    `updated_at` went back, and then `raw` keeps the earlier version as the current one, which
    the store already shows. Everything else (deletes, replacements, other updates) may."""
    operation = change.get("operationType")
    if operation == "insert":
        return False
    if operation != "update":
        return True
    description = change.get("updateDescription") or {}
    fields = [*(description.get("updatedFields") or {}), *(description.get("removedFields") or [])]
    return any(f.split(".")[0] in PLACING_FIELDS for f in fields) or not description


@dataclass
class _MicroBatch:
    """The events buffered since the last flush: the last full document or delete per `_id`
    (a later event of the same document replaces an earlier one)."""

    docs: dict[Any, dict[str, Any]] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)  # hex id -> deletion time in ms
    events: int = 0  # events buffered (before de-duplication by _id)
    first_at: float | None = None  # monotonic time of the first of them
    # Documents with an event that may retract a candidate of theirs: deletes, replacements,
    # moves and new `assigned_at`s; not inserts, status changes, reassignments (`_may_retract`).
    retracting: set[Any] = field(default_factory=set)

    def add(self, change: dict[str, Any], at: float, event_ms: int) -> None:
        self.events += 1
        if self.first_at is None:
            self.first_at = at
        key = change.get("documentKey", {}).get("_id")
        if _may_retract(change):
            self.retracting.add(key)
        if change.get("operationType") == "delete":
            if isinstance(key, ObjectId):
                self.deleted[str(key)] = event_ms
                self.docs.pop(key, None)
        elif isinstance(change.get("fullDocument"), dict):
            # None when the document is gone by lookup time: its delete follows.
            self.docs[key] = change["fullDocument"]
            if isinstance(key, ObjectId):
                self.deleted.pop(str(key), None)

    def __len__(self) -> int:
        return len(self.docs) + len(self.deleted)

    def clear(self) -> None:
        self.docs.clear()
        self.deleted.clear()
        self.retracting.clear()
        self.events = 0
        self.first_at = None


class ChangeFollower:
    """Follows one collection's change stream over open `clients` and tombstones deleted
    documents.

    With `all_changes`, inserts, updates and replacements are loaded too (the current document,
    mapped like `sync` maps it, rejects included), so the raw table follows Mongo within a
    fraction of a second; `sync` stays the authority for the watermark. This is the hot path:
    events are buffered (the last event per `_id` wins) and stored as one batch at most
    `flush_interval_s` (LOADER_FLUSH_INTERVAL_MS, 0.1 s) after the first of them, or at
    `flush_every` events; for `tasks`, each stored batch is then settled into
    `analytics.pipeline_state_store` (`loader.state.settle`) by a thread of its own (`_Settler`)
    while the next batches are stored (one settle at a time, of every batch stored since the
    last one; the follower stores on without waiting, up to `MAX_UNSETTLED` batches ahead). The
    resume token is saved in `ops.change_stream_state`, with the follower's lag, only after the
    batch is stored and settled, so a crash replays the batch (raw dedupes it, settling is
    idempotent). Resumes from the stored token (from "now" on the first run). Stops after
    `max_events` events, after `idle_timeout_s` without any, when `stop` is set, or on Ctrl-C;
    runs forever otherwise. `on_flush(events, deletes)` reports progress after every flush
    (idle ones included); `on_stored(StoredBatch)` after each batch that stored something has
    been settled (from the settling thread). `after_store` runs between storing a batch and
    handing it over for settling (tests inject crashes there); `before_settle` runs in the
    settling thread before each settle of stored batches (tests hold it there).

    The steps, one method each: open the stream at the stored resume token (`_open_stream`),
    buffer events into a micro-batch (`_MicroBatch`), store it when due (`_store`), hand it to the
    settling thread, which saves the token once the batch is settled (`_flush`); an `invalidate`
    event ends the run and forgets the token (`_invalidated`); a token the oplog no longer holds
    is reported with the way out (`_cannot_resume`).
    """

    def __init__(
        self,
        clients: Clients,
        collection: str,
        *,
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
        alive_every_s: float = ALIVE_EVERY_S,
        after_store: Callable[[], None] | None = None,
        before_settle: Callable[[], None] | None = None,
    ) -> None:
        require_collection(collection)
        self.cl = clients
        self.settings = clients.settings
        self.collection = collection
        self.interval = (
            self.settings.flush_interval_ms / 1000 if flush_interval_s is None else flush_interval_s
        )
        self.await_ms = max(1, int(self.interval * 1000)) if max_await_ms is None else max_await_ms
        self.max_events = max_events
        self.idle_timeout_s = idle_timeout_s
        self.stop = stop
        self.flush_every = flush_every
        self.on_flush = on_flush
        self.all_changes = all_changes
        self.after_store = after_store
        self.rec = RunRecord(new_run_id(), collection, kind=RunKind.watch)
        self.rss = PeakRss()
        self.mapper = BatchMapper(collection, self.settings.max_string_chars)
        self.token = load_resume_token(clients, collection)
        self.events = 0  # events processed
        self.deletes = 0  # tombstones written
        self.batch = _MicroBatch()
        self.last_event = time.monotonic()
        self.last_event_ms: int | None = None  # commit time of the last event
        self.marked_pending = False
        self.side = _Side(clients)
        # Settling and saving the position run in a thread of their own (`_Settler`, with its
        # own ClickHouse connection), so the next batch is stored while the last one settles:
        # a new task, a status change or a reassignment shows in pipeline_state as soon as its
        # batch is stored, a retraction once its batch is settled.
        self.settler = _Settler(
            clients,
            collection,
            self.token,
            on_stored=on_stored,
            save_every_s=save_every_s,
            heartbeat_s=heartbeat_s,
            alive_every_s=alive_every_s,
            before_settle=before_settle,
        )

    @property
    def resumed(self) -> bool:
        """Started from a stored resume token (else from now)."""
        return self.token is not None

    def run(self) -> FollowResult:
        """Follow until a stop condition; the run is recorded in `ops.sync_runs` either way."""
        self.settler.start()
        try:
            why = self._follow()
        except OperationFailure as exc:
            if exc.code in CANNOT_RESUME:
                self._record(RunStatus.failed, f"cannot resume change stream: {exc}")
                raise self._cannot_resume(exc) from exc
            self._record(RunStatus.failed, f"{type(exc).__name__}: {exc}")
            raise
        except KeyboardInterrupt:
            why = "interrupted"
        except BaseException as exc:
            self._record(RunStatus.failed, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.settler.stop()
            self.side.close()
        batches = self.settler.batches
        self._record(RunStatus.ok, f"watch: {why}; resumed={self.resumed}; batches={batches}")
        return FollowResult(
            self.rec.run_id,
            self.collection,
            self.events,
            self.deletes,
            self.resumed,
            why,
            batches,
            self.settler.settled_files,
        )

    # -- reading -------------------------------------------------------------------------------
    def _open_stream(self) -> ChangeStream[Any]:
        ops = ("delete", "insert", "update", "replace") if self.all_changes else ("delete",)
        coll = self.cl.db[self.collection]
        return mongo_call(
            self.settings,
            lambda: coll.watch(
                # `invalidate` too: a $match that leaves it out hides the drop of the
                # collection, and the driver then fails resuming past it.
                [{"$match": {"operationType": {"$in": [*ops, "invalidate"]}}}],
                full_document="updateLookup" if self.all_changes else None,
                resume_after=self.token,
                max_await_time_ms=self.await_ms,
                batch_size=self.flush_every,
            ),
        )

    def _follow(self) -> str:
        """Read, buffer and flush until a stop condition; returns why it stopped."""
        with self._open_stream() as stream:
            while True:
                change = mongo_call(self.settings, stream.try_next)
                if change is not None:
                    self.last_event = time.monotonic()
                    if change.get("operationType") == "invalidate":
                        self._invalidated(stream)
                        return INVALIDATED
                    self.events += 1
                    self.last_event_ms = _deleted_at_ms(change)
                    self.batch.add(change, self.last_event, self.last_event_ms)
                    if not self._due():
                        continue
                leaving = self._leaving()
                self._flush(stream, final=bool(leaving))  # leaving: save the position now
                if leaving:
                    return leaving

    def _due(self) -> bool:
        """The micro-batch is full, old enough, or holds the last event asked for."""
        first_at = self.batch.first_at if self.batch.first_at is not None else self.last_event
        return (
            len(self.batch) >= self.flush_every
            or self.last_event - first_at >= self.interval
            or (self.max_events is not None and self.events >= self.max_events)
        )

    def _leaving(self) -> str:
        """Why to stop after this flush ("" to go on)."""
        if self.max_events is not None and self.events >= self.max_events:
            return "max_events"
        if self.stop is not None and self.stop.is_set():
            return "stop requested"
        idle = time.monotonic() - self.last_event
        if self.idle_timeout_s is not None and idle >= self.idle_timeout_s:
            return "idle"
        return ""

    def _invalidated(self, stream: ChangeStream[Any]) -> None:
        """The collection was dropped or renamed: this stream cannot resume. Store what is
        buffered, then forget the token so the next run starts from now; deletes before then
        are for `reconcile` (or a full refresh) to find."""
        self._flush(stream, final=True)
        save_resume_token(self.cl, self.collection, None, self.events)

    def _cannot_resume(self, exc: OperationFailure) -> RuntimeError:
        code = (exc.details or {}).get("codeName", exc.code)
        return RuntimeError(
            f"The change stream of {self.collection} cannot resume from the stored token "
            f"({code}: the oplog no longer holds that position, or "
            "the collection was dropped). Run `python -m loader reconcile` to catch up on "
            "deletes, then `python -m loader watch --reset` to start from now."
        )

    # -- storing -------------------------------------------------------------------------------
    def _flush(self, stream: ChangeStream[Any], final: bool = False) -> None:
        """Store the micro-batch (if any), then hand it and the stream position after it to
        the settling thread, which saves the position once the batch is settled. An idle
        flush hands over the position alone (the heartbeat)."""
        stored = bool(self.batch)
        steps = Steps()
        if stored:
            with steps.time("room"):
                self.settler.wait_for_room()
        self.settler.check()
        events = self.batch.events
        retracting, written, tombstoned = self._store(steps) if stored else (None, 0, 0)
        if stored and self.after_store is not None:
            self.after_store()
        self.rss.sample()
        self.settler.put(
            _Pending(
                retracting,
                stream.resume_token,
                self.events,
                stored,
                events,
                written,
                tombstoned,
                self.last_event_ms,
                final,
                steps,
            )
        )
        if final:
            self.settler.drain()  # settled and the position saved before leaving
        self.batch.clear()
        if self.on_flush:
            self.on_flush(self.events, self.deletes)

    def _store(self, steps: Steps) -> tuple[RetractingTasks | None, int, int]:
        """Write the micro-batch: rows and rejects, then tombstones. Returns the tasks to
        settle (None unless `tasks`), the rows written and the tombstones written."""
        cl, collection, run_id = self.cl, self.collection, self.rec.run_id
        remark: Future[None] | None = None
        if not self.marked_pending:
            # Before the first write: the downstream models need a build.
            with steps.time("mark"):
                clickhouse_call(
                    self.settings, lambda: mark_build_pending(cl.clickhouse, collection, run_id)
                )
            self.marked_pending = True
        elif self.batch.deleted:
            # Again with a batch of deletes: a build may have cleared the mark meanwhile, and
            # a delete is invisible to the watermark, so no scheduled run would load it (a
            # changed document is: the next run's sync reads it again and marks it). This
            # mark is written while the batch is (`_Side`): it is in place before the batch
            # is handed to the settler, hence before its position is saved, and a follower
            # that dies before then marks again before its first write when it resumes.
            remark = self.side.submit(
                lambda own: clickhouse_call(
                    own.settings, lambda: mark_build_pending(own.clickhouse, collection, run_id)
                )
            )
        deleted = dict(self.batch.deleted)
        lookup: Future[list[list[Any]]] | None = None
        if deleted and len(deleted) <= FEW_TOMBSTONES:
            # The tombstones' rows are looked up while the batch's rows are mapped, and go into
            # raw in the same insert as them (one set of new parts to merge instead of two).
            lookup = self.side.submit(lambda own: tombstone_rows(own, collection, deleted, run_id))
        retracting = RetractingTasks()
        written = tombstoned = 0
        if self.batch.docs:
            for doc in self.batch.docs.values():
                self.mapper.add(doc)
            mapped = self.mapper.take()
            with steps.time("rows"):
                with_rows: list[list[Any]] = []
                if lookup is not None and mapped.rows:
                    with_rows, lookup = lookup.result(), None
                store_rows(cl, mapped, run_id, tombstones=with_rows)
                store_rejects(cl, mapped, run_id)
                tombstoned = len(with_rows)
            self.rec.docs_read += len(self.batch.docs)
            self.rec.rows_written += mapped.rows
            self.rec.rejects += len(mapped.rejects)
            written = mapped.rows
            if collection == "tasks":
                retracting.add_batch(mapped, {id_to_str(k) for k in self.batch.retracting})
        if self.batch.deleted:
            with steps.time("tombstones"):
                if lookup is not None:  # no rows to go with
                    tombstoned = insert_tombstones(cl, collection, lookup.result())
                elif len(deleted) > FEW_TOMBSTONES:
                    tombstoned = write_tombstones(cl, collection, deleted, run_id)
            self.deletes += tombstoned
            retracting.add_deleted(self.batch.deleted)
        if remark is not None:
            with steps.time("mark"):  # the part of the mark the writes did not cover
                remark.result()
        return (retracting if collection == "tasks" else None), written, tombstoned

    def _record(self, status: RunStatus, message: str) -> None:
        rec = self.rec
        rec.finish(status, f"{message}; events={self.events}")
        rec.deletes = self.deletes
        rec.peak_rss_bytes = self.rss.peak
        write_run_or_log(self.cl, rec)


def follower_running(ch: Client, collection: str) -> bool:
    """Has a follower of `collection` saved its position within `SILENT_AFTER_S` (its
    heartbeat)?"""
    sql = (
        f"SELECT count() FROM {CHANGE_STREAM_STATE.qualified} FINAL WHERE collection = {{c:String}}"
        " AND resume_token != '' AND saved_at > now64(6) - toIntervalMillisecond({ms:UInt64})"
    )
    params = {"c": collection, "ms": int(SILENT_AFTER_S * 1000)}
    return int(str(ch.command(sql, parameters=params))) > 0


def follow_changes(
    settings: Settings, collection: str, *, clients: Clients | None = None, **options: Any
) -> FollowResult:
    """Follow `collection`'s change stream with a `ChangeFollower` (`options` are its keyword
    arguments) over `clients`, or over connections opened and closed here.

    A MONGO_DB that names no database stops it before it saves any position
    (`loader.identity.check_followable`)."""
    require_collection(collection)
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        check_followable(cl, collection)
        return ChangeFollower(cl, collection, **options).run()


def reset_resume_token(
    settings: Settings, collection: str, *, clients: Clients | None = None
) -> None:
    """Forget the stored position: the next `follow_changes` starts from now."""
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        save_resume_token(cl, collection, None, 0)
