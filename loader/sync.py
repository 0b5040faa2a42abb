"""Incremental sync of one Mongo collection into `raw.<collection>` by watermark.

Per batch: read `batch_size` documents in `(updated_at, _id)` order past the read bounds, map
them to columns (bad ones to `raw.rejects`), insert the rows as one Arrow batch, *then* save the
watermark at the batch's last document. A crash between insert and save re-reads that batch on
the next run; the raw table's ReplacingMergeTree collapses the duplicates. Only one batch is in
memory at a time, so memory does not grow with the collection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import bson
from bson import MinKey, ObjectId
from bson.datetime_ms import DatetimeMS
from pymongo.collection import Collection
from pymongo.cursor import Cursor

from loader.build_pending import mark_build_pending
from loader.clients import (
    MONGO_TRANSIENT,
    Clients,
    clickhouse_call,
    mongo_call,
    mongo_unavailable,
    open_clients,
)
from loader.errors import add_note, failure_message, watermark_outcome
from loader.identity import Identity, check_identity, collection_uuid, record_identity
from loader.idset import id_set
from loader.mapping import (
    CODEC_OPTIONS,
    BatchMapper,
    MappedBatch,
    Reject,
    dump_document,
    id_to_str,
    to_arrow,
    with_bookkeeping,
)
from loader.runs import PeakRss, RunRecord, new_run_id, write_run
from loader.schema import (
    CHANGE_STREAM_STATE,
    REJECTS,
    ensure_schema,
    fields_of,
    raw_table,
    require_collection,
)
from loader.settings import Settings
from loader.watermark import (
    MIN_BSON_DATE,
    ReadBounds,
    Watermark,
    load_watermark,
    now_ms,
    read_bounds,
    reset_watermark,
    save_watermark,
)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

WATERMARK_INDEX = [("updated_at", 1), ("_id", 1)]
WATERMARK_INDEX_NAME = "updated_at_1__id_1"


def undatable_cursors(
    coll: Collection, projection: dict[str, int] | None, upper_ms: int
) -> list[Cursor]:
    """Cursors over the documents the main read cannot reach: `updated_at` missing or not a
    date, or a date past `upper_ms`.

    An index orders keys by BSON type first (MinKey < missing/null < numbers < strings <
    objects < arrays < binData < ObjectId < bool < date < timestamp < regex < code < MaxKey),
    so every `updated_at` that is not a date lies below the lowest date or above the highest
    one, and dates past `upper_ms` sit just above those the main read stops at. Two scans of
    the watermark index bounded with `min`/`max` therefore examine only the keys of the
    documents they return (a `$type` query examines every key). An array is indexed by its
    elements (an empty one as undefined): one with a non-date element is found here, one of
    dates only by the main read, and either way it is rejected.
    """
    below_dates = (
        coll.find({}, projection)
        .hint(WATERMARK_INDEX)
        .min([("updated_at", MinKey()), ("_id", MinKey())])
        .max([("updated_at", MIN_BSON_DATE), ("_id", MinKey())])  # exclusive
    )
    past_upper = (
        coll.find({}, projection)
        .hint(WATERMARK_INDEX)
        .min([("updated_at", DatetimeMS(upper_ms + 1)), ("_id", MinKey())])
    )
    return [below_dates, past_upper]


@dataclass(frozen=True)
class SyncResult:
    run_id: str
    collection: str
    status: str
    docs_read: int
    rows_written: int
    rejects: int
    deletes: int
    watermark_before: str
    watermark_after: str
    duration_s: float
    peak_rss_bytes: int
    index_created: bool = False
    message: str = ""
    # Why the collection was reloaded from scratch when it was not asked for ("" otherwise).
    source_replaced: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchStored:
    """Passed to `after_insert`: the batch is in ClickHouse, the watermark not yet moved."""

    batch_no: int
    rows: int
    rejects: int
    watermark: Watermark


class ProgressSink(Protocol):
    def start(self, collection: str, total: int | None) -> None: ...

    def advance(self, docs: int) -> None: ...


def ensure_watermark_index(coll: Collection, settings: Settings) -> bool:
    """Make sure the `(updated_at, _id)` index is built; True when it was missing."""
    existing = mongo_call(settings, coll.index_information)
    missing = not any(info.get("key") == WATERMARK_INDEX for info in existing.values())
    if missing:
        log.warning(
            "creating index %s on %s.%s (needed by the watermark query)",
            WATERMARK_INDEX_NAME,
            coll.database.name,
            coll.name,
        )
    # Asked even when listed: `listIndexes` shows an index another loader is still building,
    # and a hinted query fails on it; `createIndexes` waits for that build (a no-op once built).
    mongo_call(settings, lambda: coll.create_index(WATERMARK_INDEX, name=WATERMARK_INDEX_NAME))
    return missing


def watermark_range(
    coll: Collection, bounds: ReadBounds, fields: dict[str, int], *, raw: bool = False
) -> Cursor:
    """Documents past `bounds`, scanning the watermark index from the watermark's key."""
    start, end = bounds.index_range()
    find = coll.find_raw_batches if raw else coll.find
    return find(bounds.mongo_filter(), fields).hint(WATERMARK_INDEX).min(start).max(end)


def projection(collection: str) -> dict[str, int]:
    """The fields a read asks Mongo for: `_id` and the mapped ones."""
    return {"_id": 1} | {f.name: 1 for f in fields_of(collection)}


def prepare_clients(clients: Clients) -> None:
    """Migrate the loader's tables once per `Clients` (cheap on later calls)."""
    if "loader" not in clients.schema_ready:
        clickhouse_call(clients.settings, lambda: ensure_schema(clients.clickhouse))
        clients.schema_ready.add("loader")


def prepare_collection(clients: Clients, collection: str) -> bool:
    """`prepare_clients`, and the watermark index built, once per `Clients` and collection
    (a flow run probes, then loads, through one `Clients`); True when the index was missing."""
    prepare_clients(clients)
    key = f"watermark index of {collection}"
    if key in clients.schema_ready:
        return False
    created = ensure_watermark_index(clients.db[collection], clients.settings)
    clients.schema_ready.add(key)
    return created


class _Run:
    """State of one `sync_collection` call."""

    def __init__(
        self,
        clients: Clients,
        collection: str,
        batch_size: int,
        after_insert: Callable[[BatchStored], None] | None,
        progress: ProgressSink | None,
        before_insert: Callable[[int], None] | None = None,
    ) -> None:
        self.clients = clients
        self.settings = clients.settings
        self.collection = collection
        self.coll: Collection = clients.db[collection]
        self.batch_size = batch_size
        self.after_insert = after_insert
        self.before_insert = before_insert
        self.progress = progress
        self.run_id = new_run_id()
        self.record = RunRecord(self.run_id, collection)
        self.rss = PeakRss()
        self.mapper = BatchMapper(collection, self.settings.max_string_chars)
        self.batch_no = 0
        self.watermark: Watermark | None = None
        self.read_started_ms = 0
        self.marked_pending = False

    def mark_pending(self) -> None:
        """Before the first write: the downstream models need a build (see build_pending)."""
        if not self.marked_pending:
            clickhouse_call(
                self.settings,
                lambda: mark_build_pending(self.clients.clickhouse, self.collection, self.run_id),
            )
            self.marked_pending = True

    # -- writing -------------------------------------------------------------------------------
    def _about_to_write(self) -> None:
        """Before a batch's first write to ClickHouse: mark the build pending, tell the hook."""
        self.mark_pending()
        if self.before_insert:
            self.before_insert(self.batch_no + 1)

    def _insert_rows(self, batch: MappedBatch) -> None:
        store_rows(self.clients, batch, self.run_id, on_built=self.rss.sample)

    def _insert_rejects(self, batch: MappedBatch) -> None:
        store_rejects(self.clients, batch, self.run_id)

    def flush(self, docs: list[dict[str, Any]]) -> None:
        """Map documents one by one, store them, then move the watermark past the last one."""
        if not docs:
            return
        for doc in docs:
            self.mapper.add(doc)
        batch = self.mapper.take()
        self.rss.sample()
        self._about_to_write()
        self._insert_rows(batch)
        self._insert_rejects(batch)
        last = _last_dated(docs)
        # None when only arrays of dates were read (all rejected): nothing to move the mark to.
        mark = None if last is None else (int(last["updated_at"]), last["_id"])
        self._stored(len(docs), batch.rows, len(batch.rejects), mark)

    def flush_raw(self, raw: bytes) -> None:
        """Store a raw server batch through Arrow when every document maps; otherwise map it
        document by document (`flush`), which records each reject with its reason."""
        # Imported here: pymongoarrow brings pandas and pyarrow (half a second), which a run
        # that only probes for changes (`has_changes`, a no-op flow run) never needs.
        import pyarrow as pa

        from loader.columnar import decode_valid_rows

        columns = decode_valid_rows(raw, self.collection, self.settings.max_string_chars)
        if columns is None:
            self.flush(bson.decode_all(raw, CODEC_OPTIONS))
            return
        rows = len(columns["_id"])
        if not rows:
            return
        table = with_bookkeeping(self.collection, columns, self.run_id, now_ms())
        self.rss.sample()
        self._about_to_write()
        store_table(self.clients, self.collection, table)
        last_ms = table["updated_at"][-1].cast(pa.int64()).as_py()
        self._stored(rows, rows, 0, (last_ms, ObjectId(table["_id"][-1].as_py())))

    def _stored(self, docs: int, rows: int, rejects: int, mark: tuple[int, Any] | None) -> None:
        """Count a stored batch and save the watermark at `mark` (updated_at ms, _id)."""
        self.record.docs_read += docs
        self.record.rows_written += rows
        self.record.rejects += rejects
        if mark is None:
            return
        wm = Watermark.at(mark[0], mark[1], self.read_started_ms)
        self.batch_no += 1
        if self.after_insert:
            self.after_insert(BatchStored(self.batch_no, rows, rejects, wm))
        clickhouse_call(
            self.settings,
            lambda: save_watermark(self.clients.clickhouse, self.collection, wm, self.run_id),
        )
        self.watermark = wm
        self.rss.sample()
        if self.progress:
            self.progress.advance(docs)

    # -- reading -------------------------------------------------------------------------------
    def _cursor(self, bounds: ReadBounds, raw: bool) -> Cursor:
        return (
            watermark_range(self.coll, bounds, projection(self.collection), raw=raw)
            .sort(WATERMARK_INDEX)
            .batch_size(self.batch_size)
            # The index provides the order; should it ever not (an array stored in `updated_at`
            # makes it multikey), let the server sort on disk rather than fail at 100 MB.
            .allow_disk_use(True)
        )

    def _read_batches(self, bounds: ReadBounds) -> None:
        """One pass of the main read: store batch after batch until the cursor is drained."""
        if self.settings.decoder == "pymongoarrow":
            for raw in self._cursor(bounds, raw=True):  # one server reply, <= batch_size docs
                self.flush_raw(raw)
            return
        buf: list[dict[str, Any]] = []
        for doc in self._cursor(bounds, raw=False):
            buf.append(doc)
            if len(buf) >= self.batch_size:
                self.flush(buf)
                buf = []
        self.flush(buf)

    def read_main(self, bounds: ReadBounds) -> None:
        """Stream documents past `bounds` in batches, reopening the cursor after transient
        errors at the last stored position (documents read but not stored are re-read)."""
        failures = 0
        stored_before = -1
        while True:
            try:
                self._read_batches(bounds)
                return
            except MONGO_TRANSIENT as exc:
                # Count consecutive failures only: a batch stored since the last one resets it.
                failures = 1 if self.batch_no != stored_before else failures + 1
                stored_before = self.batch_no
                if failures >= self.settings.retry_attempts:
                    raise mongo_unavailable(self.settings, failures, exc) from exc
                wait = min(
                    self.settings.retry_max_wait,
                    self.settings.retry_initial_wait * 2 ** (failures - 1),
                )
                log.warning("MongoDB read failed (%s); resuming in %.1fs", exc, wait)
                time.sleep(wait)
                if self.watermark is not None:
                    wm = self.watermark
                    bounds = ReadBounds(wm.updated_at_ms, wm.id_value(), bounds.upper_ms)

    def sweep_undatable(self, upper_ms: int) -> None:
        """Reject, once, documents the main read cannot reach: `updated_at` missing or not a
        date, or further in the future than `max_future_seconds`. Ids already in
        `raw.rejects` are skipped, so a quiet collection costs two empty index probes."""
        proj = projection(self.collection)
        for cursor in undatable_cursors(self.coll, proj, upper_ms):
            buf: list[dict[str, Any]] = []
            for doc in cursor:
                buf.append(doc)
                if len(buf) >= self.batch_size:
                    self._reject_new(buf, upper_ms)
                    buf = []
            self._reject_new(buf, upper_ms)

    def _reject_new(self, docs: list[dict[str, Any]], upper_ms: int) -> None:
        if not docs:
            return
        ids = [id_to_str(d.get("_id")) for d in docs]
        ch = self.clients.clickhouse
        with id_set(self.clients, [(i, 0) for i in ids]) as batch_ids:
            known = {
                row[0]
                for row in clickhouse_call(
                    self.settings,
                    lambda: (
                        ch.query(
                            f"SELECT DISTINCT _id FROM {REJECTS.qualified} "
                            f"WHERE collection = {{c:String}} AND _id IN {batch_ids.keys()}",
                            parameters={"c": self.collection},
                        ).result_rows
                    ),
                )
            }
        fresh = [d for d, i in zip(docs, ids, strict=True) if i not in known]
        too_late = (
            f"updated_at: more than {self.settings.max_future_seconds:g}s ahead of the loader's "
            "clock (LOADER_MAX_FUTURE_SECONDS)"
        )
        rejects = []
        for doc in fresh:
            problems = self.mapper.problems(doc)
            updated_at = doc.get("updated_at")
            if type(updated_at) is DatetimeMS and int(updated_at) > upper_ms:
                problems.append(too_late)
            rejects.append(Reject(doc.get("_id"), "; ".join(problems), doc))
        batch = MappedBatch(self.collection, {"_id": []}, rejects)
        if rejects:
            self.mark_pending()
        self._insert_rejects(batch)
        self.record.docs_read += len(fresh)
        self.record.rejects += len(batch.rejects)


def _last_dated(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last document whose `updated_at` is a date (the main read also returns documents
    holding an array of dates, through their multikey index entries)."""
    for doc in reversed(docs):
        if type(doc.get("updated_at")) is DatetimeMS:
            return doc
    return None


def store_rows(
    clients: Clients, batch: MappedBatch, run_id: str, on_built: Callable[[], Any] | None = None
) -> None:
    """Insert the batch's rows into `raw.<collection>` as one Arrow batch."""
    if not batch.rows:
        return
    table = to_arrow(batch, run_id, now_ms())
    if on_built:
        on_built()
    store_table(clients, batch.collection, table)


def store_table(clients: Clients, collection: str, table: pa.Table) -> None:
    """Insert rows in `raw.<collection>` column order (see `mapping.with_bookkeeping`)."""
    ch = clients.clickhouse
    clickhouse_call(
        clients.settings, lambda: ch.insert_arrow(raw_table(collection).qualified, table)
    )


def store_rejects(clients: Clients, batch: MappedBatch, run_id: str) -> None:
    """Insert the batch's rejects into `raw.rejects`, each with its whole current document."""
    if not batch.rejects:
        return
    # Documents were read with a projection: store the whole document as it is now (or as
    # read, if it has gone since), so that the reject can be diagnosed.
    coll = clients.db[batch.collection]
    ids = [r.id for r in batch.rejects if r.id is not None]
    full: dict[str, Any] = {}
    if ids:
        for doc in mongo_call(clients.settings, lambda: list(coll.find({"_id": {"$in": ids}}))):
            full[id_to_str(doc.get("_id"))] = doc
    now = datetime.now(UTC)
    rows = []
    for r in batch.rejects:
        key = id_to_str(r.id)
        doc = full.get(key, r.doc)
        rows.append([batch.collection, key, r.reason, dump_document(doc), run_id, now, 0])
    ch = clients.clickhouse
    clickhouse_call(
        clients.settings,
        lambda: ch.insert(REJECTS.qualified, rows, column_names=[n for n, _ in REJECTS.columns]),
    )


def sync_collection(
    settings: Settings,
    collection: str,
    *,
    full_refresh: bool = False,
    batch_size: int | None = None,
    clients: Clients | None = None,
    after_insert: Callable[[BatchStored], None] | None = None,
    progress: ProgressSink | None = None,
    before_insert: Callable[[int], None] | None = None,
) -> SyncResult:
    """Load what changed in `collection` since its watermark into `raw.<collection>`.

    `full_refresh` empties `raw.<collection>`, its rows in `raw.rejects` and its watermark first,
    and marks the downstream models for a full rebuild; so does a replaced source collection
    (see `loader.identity`), without being asked. `clients`: reuse open connections (one pair
    per process run); opened and closed here if None. `before_insert(n)` is called before batch
    n's first write to ClickHouse, `after_insert` after each batch is stored and before its
    watermark is saved, `progress.advance` after the watermark is saved (tests inject crashes
    and server faults at these points, on whichever decoder path the batch takes).
    Raises `ServerUnavailable` when a server stays unreachable.
    """
    require_collection(collection)
    size = batch_size or settings.batch_size
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        run = _Run(cl, collection, size, after_insert, progress, before_insert)
        rec = run.record
        ch = cl.clickhouse
        before: Watermark | None = None
        index_created = False
        identity: Identity | None = None
        try:
            before = clickhouse_call(settings, lambda: load_watermark(ch, collection))
            rec.watermark_before = before.describe() if before else ""
            # Before the index is ensured: creating it would create a missing collection.
            identity = _identity(cl, collection, full_refresh)
            index_created = prepare_collection(cl, collection)
            if full_refresh or identity.replaced:
                if identity.replaced:
                    log.warning("%s", identity.describe_replacement())
                clickhouse_call(
                    settings,
                    lambda: mark_build_pending(ch, collection, run.run_id, full_refresh=True),
                )
                run.marked_pending = True
                _truncate(cl, collection, reset_change_stream=identity.replaced)
                before = None  # the rebuilt table is read from the beginning
            if identity.current and identity.current != identity.recorded:
                record_identity(cl, collection, identity.current, run.run_id)
            run.read_started_ms = now_ms()
            bounds = read_bounds(
                before, settings.overlap_seconds, settings.max_future_seconds, run.read_started_ms
            )
            if progress:
                total = mongo_call(
                    settings,
                    lambda: run.coll.count_documents(bounds.mongo_filter(), hint=WATERMARK_INDEX),
                )
                progress.start(collection, total)
            run.read_main(bounds)
            run.sweep_undatable(bounds.upper_ms)
            after = run.watermark or before
            rec.watermark_after = after.describe() if after else ""
            rec.peak_rss_bytes = run.rss.peak
            if rec.docs_read != rec.rows_written + rec.rejects:
                raise AssertionError(
                    f"accounting error: read {rec.docs_read} != written {rec.rows_written} "
                    f"+ rejected {rec.rejects}"
                )
            notes = []
            if identity.replaced:
                notes.append(identity.describe_replacement())
            if not identity.current:
                notes.append(f"the collection {collection} does not exist in MongoDB")
            if index_created:
                notes.append(f"created index {WATERMARK_INDEX_NAME}")
            if full_refresh:
                notes.append("full refresh")
            rec.finish("ok", "; ".join(notes))
        except BaseException as exc:
            # Say whether the watermark moved: batches stored before the failure moved it.
            after, moved = watermark_outcome(collection, before, run.watermark)
            rec.watermark_after = after.describe() if after else rec.watermark_before
            rec.peak_rss_bytes = run.rss.peak
            rec.finish("failed", failure_message(exc, moved))
            add_note(exc, moved)
            write_run_or_log(cl, rec)
            raise
        clickhouse_call(settings, lambda: write_run(ch, rec))
        return SyncResult(
            run_id=rec.run_id,
            collection=collection,
            status=rec.status,
            docs_read=rec.docs_read,
            rows_written=rec.rows_written,
            rejects=rec.rejects,
            deletes=rec.deletes,
            watermark_before=rec.watermark_before,
            watermark_after=rec.watermark_after,
            duration_s=rec.duration_s,
            peak_rss_bytes=rec.peak_rss_bytes,
            index_created=index_created,
            message=rec.message,
            source_replaced=identity.describe_replacement() if identity.replaced else "",
        )


def write_run_or_log(clients: Clients, rec: RunRecord) -> None:
    """Write a run record where an error is already on its way: log a failure, never raise."""
    try:
        write_run(clients.clickhouse, rec)
    except Exception as exc:  # noqa: BLE001 - the original error matters more
        log.error("could not record failed run %s in ops.sync_runs: %s", rec.run_id, exc)


def _identity(clients: Clients, collection: str, full_refresh: bool) -> Identity:
    """The source's identity; a full refresh may proceed on a collection that is gone."""
    if full_refresh:
        return Identity(collection, collection_uuid(clients, collection), "")
    return check_identity(clients, collection)


def _truncate(clients: Clients, collection: str, *, reset_change_stream: bool) -> None:
    ch = clients.clickhouse
    settings = clients.settings

    def go() -> None:
        ch.command(f"TRUNCATE TABLE IF EXISTS {raw_table(collection).qualified}")
        ch.command(
            f"DELETE FROM {REJECTS.qualified} WHERE collection = {{c:String}}",
            parameters={"c": collection},
        )
        reset_watermark(ch, collection)
        if reset_change_stream:
            # The stored resume token belongs to the old collection's stream.
            ch.command(
                f"INSERT INTO {CHANGE_STREAM_STATE.qualified} "
                "(collection, resume_token, events, saved_at) "
                "SELECT {c:String}, '', 0, now64(6)",
                parameters={"c": collection},
            )

    clickhouse_call(settings, go)
