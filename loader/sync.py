"""Incremental sync of one Mongo collection into `raw.<collection>` by watermark.

Per batch: read `batch_size` documents in `(updated_at, _id)` order past the read bounds, map
them to columns (bad ones to `raw.rejects`), insert the rows as one Arrow batch, *then* save the
watermark at the batch's last document. A crash between insert and save re-reads that batch on
the next run; the raw table's ReplacingMergeTree collapses the duplicates. Only one batch is in
memory at a time, so memory does not grow with the collection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import bson
from bson import MinKey, ObjectId
from bson.datetime_ms import DatetimeMS
from pymongo.collection import Collection
from pymongo.cursor import Cursor
from pymongo.errors import OperationFailure
from pymongo.read_preferences import (
    ReadPreference,
    make_read_preference,
    read_pref_mode_from_name,
)

from loader.build_pending import mark_build_pending
from loader.clients import (
    Clients,
    clickhouse_call,
    mongo_call,
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
    id_to_str,
    with_bookkeeping,
)
from loader.runs import PeakRss, RunRecord, RunStatus, new_run_id
from loader.schema import (
    REJECTS,
    SNAPSHOT_RANGES,
    ensure_schema,
    fields_of,
    mutation_target,
    raw_table,
    require_collection,
)
from loader.settings import Settings
from loader.shards import UNSHARDED, Shard, start_watermark
from loader.store import (
    recorded_run,
    save_resume_token,
    store_rejects,
    store_rows,
    store_table,
)
from loader.watermark import (
    MIN_BSON_DATE,
    ReadBounds,
    Watermark,
    now_ms,
    read_bounds,
    reset_watermark,
    save_watermark,
)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
T = TypeVar("T")

WATERMARK_INDEX = [("updated_at", 1), ("_id", 1)]
WATERMARK_INDEX_NAME = "updated_at_1__id_1"
IndexKey = list[tuple[str, Any]]  # a key of the watermark index, for `min` / `max` (exclusive)


def undatable_cursors(
    coll: Collection,
    projection: dict[str, int] | None,
    upper_ms: int,
    shard_filter: dict[str, Any] | None = None,
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
    lowest: IndexKey = [("updated_at", MinKey()), ("_id", MinKey())]
    first_date: IndexKey = [("updated_at", MIN_BSON_DATE), ("_id", MinKey())]
    past: IndexKey = [("updated_at", DatetimeMS(upper_ms + 1)), ("_id", MinKey())]
    below_dates = (
        coll.find(shard_filter or {}, projection).hint(WATERMARK_INDEX).min(lowest).max(first_date)
    )
    past_upper = coll.find(shard_filter or {}, projection).hint(WATERMARK_INDEX).min(past)
    return [below_dates, past_upper]


@dataclass
class SyncResult(RunRecord):
    """A sync's run record (the row written to `ops.sync_runs`), and what only a sync says."""

    index_created: bool = False
    # Why the collection was reloaded from scratch when it was not asked for ("" otherwise).
    source_replaced: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO text, the duration in seconds."""
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat()
        d["ended_at"] = self.ended_at.isoformat() if self.ended_at else None
        d["duration_s"] = self.duration_s
        return d


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
    coll: Collection,
    bounds: ReadBounds,
    fields: dict[str, int],
    *,
    raw: bool = False,
    shard: Shard = UNSHARDED,
) -> Cursor:
    """Documents past `bounds` (of `shard`), scanning the watermark index from the
    watermark's key."""
    start, end = bounds.index_range()
    find = coll.find_raw_batches if raw else coll.find
    flt = bounds.mongo_filter() | shard.mongo_filter()
    return find(flt, fields).hint(WATERMARK_INDEX).min(start).max(end)


def projection(collection: str) -> dict[str, int]:
    """The fields a read asks Mongo for: `_id` and the mapped ones."""
    return {"_id": 1} | {f.name: 1 for f in fields_of(collection)}


def prepare_clients(clients: Clients) -> None:
    """Check the server's version and migrate the loader's tables once per `Clients` (cheap
    on later calls)."""
    if "loader" not in clients.schema_ready:
        clients.version()
        clickhouse_call(
            clients.settings,
            lambda: ensure_schema(clients.clickhouse, clients.settings.clickhouse_cluster),
        )
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


class LoadRun:
    """State of one load: a `sync_collection` call, or a snapshot range (`loader.snapshot`),
    which stores its batches through `store_docs` and `reject_new`."""

    def __init__(
        self,
        clients: Clients,
        collection: str,
        batch_size: int,
        after_insert: Callable[[BatchStored], None] | None,
        progress: ProgressSink | None,
        before_insert: Callable[[int], None] | None = None,
        shard: Shard = UNSHARDED,
    ) -> None:
        self.clients = clients
        self.shard = shard
        self.watermark_key = shard.key(collection)
        self.settings = clients.settings
        self.collection = collection
        # The snapshot reads where LOADER_READ_PREFERENCE says (a name pymongo knows).
        self.coll: Collection = clients.db[collection].with_options(
            read_preference=make_read_preference(
                read_pref_mode_from_name(self.settings.read_preference), None
            )
        )
        self.batch_size = batch_size
        self.after_insert = after_insert
        self.before_insert = before_insert
        self.progress = progress
        self.run_id = new_run_id()
        self.record = SyncResult(self.run_id, collection, shard=str(shard) if shard.sharded else "")
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
        batch = self.store_docs(docs)
        last = _last_dated(docs)
        # None when only arrays of dates were read (all rejected): nothing to move the mark to.
        mark = None if last is None else (int(last["updated_at"]), last["_id"])
        self._stored(len(docs), batch.rows, len(batch.rejects), mark)

    def store_docs(self, docs: list[dict[str, Any]]) -> MappedBatch:
        """Map documents one by one and store the rows and the rejects (with their reasons);
        the caller saves its own progress after (a watermark, or a snapshot range's)."""
        for doc in docs:
            self.mapper.add(doc)
        batch = self.mapper.take()
        self.rss.sample()
        self._about_to_write()
        self._insert_rows(batch)
        self._insert_rejects(batch)
        return batch

    def flush_raw(self, raw: bytes) -> None:
        """Store a raw server batch through Arrow when every document maps; otherwise map it
        document by document (`flush`), which records each reject with its reason."""
        import pyarrow as pa

        table = self.store_valid_rows(raw)
        if table is None:
            self.flush(bson.decode_all(raw, CODEC_OPTIONS))
            return
        rows = table.num_rows
        last_ms = table["updated_at"][-1].cast(pa.int64()).as_py()
        self._stored(rows, rows, 0, (last_ms, ObjectId(table["_id"][-1].as_py())))

    def store_valid_rows(self, raw: bytes, upper_ms: int | None = None) -> pa.Table | None:
        """Store a raw server batch as one Arrow table when every document maps (and, given
        `upper_ms`, none is dated past it); None, with nothing stored, when one does not (or
        the batch is empty): the caller then maps it document by document."""
        # Imported here: pymongoarrow brings pandas and pyarrow (half a second), which a run
        # that only probes for changes (`has_changes`, a no-op flow run) never needs.
        import pyarrow as pa
        import pyarrow.compute as pc

        from loader.columnar import decode_valid_rows

        columns = decode_valid_rows(raw, self.collection, self.settings.max_string_chars)
        if columns is None or not len(columns["_id"]):
            return None
        table = with_bookkeeping(self.collection, columns, self.run_id, now_ms())
        latest = pc.max(table["updated_at"].cast(pa.int64())).as_py()
        if upper_ms is not None and latest > upper_ms:
            return None
        self.rss.sample()
        self._about_to_write()
        store_table(self.clients, self.collection, table)
        return table

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
            lambda: save_watermark(self.clients.clickhouse, self.watermark_key, wm, self.run_id),
        )
        self.watermark = wm
        self.rss.sample()
        if self.progress:
            self.progress.advance(docs)

    # -- reading -------------------------------------------------------------------------------
    def _cursor(self, bounds: ReadBounds, raw: bool) -> Cursor:
        return (
            watermark_range(
                self.coll, bounds, projection(self.collection), raw=raw, shard=self.shard
            )
            .sort(WATERMARK_INDEX)
            .batch_size(self.batch_size)
            # The index provides the order; should it ever not (an array stored in `updated_at`
            # makes it multikey), let the server sort on disk rather than fail at 100 MB.
            .allow_disk_use(True)
        )

    def _read_batches(self, bounds: ReadBounds) -> None:
        """One pass of the main read: store batch after batch until the cursor is drained."""
        # `with`: a failed pass closes its server cursor now, not when the exception's frames
        # are collected (an idle cursor otherwise stays open on the server for ten minutes).
        if self.settings.decoder == "pymongoarrow":
            with self._cursor(bounds, raw=True) as raw_batches:
                for raw in raw_batches:  # one server reply, <= batch_size docs
                    self.flush_raw(raw)
            return
        buf: list[dict[str, Any]] = []
        with self._cursor(bounds, raw=False) as cursor:
            for doc in cursor:
                buf.append(doc)
                if len(buf) >= self.batch_size:
                    self.flush(buf)
                    buf = []
        self.flush(buf)

    def hinted(self, read: Callable[[], T]) -> T:
        """Run a read that hints the watermark index. A secondary (LOADER_READ_PREFERENCE) may
        not have an index the primary has just built, its commit replicating a moment later:
        the read is then done again on the primary, where this run stays."""
        try:
            return read()
        except OperationFailure as exc:
            on_primary = self.coll.read_preference == ReadPreference.PRIMARY
            if on_primary or "hint provided does not correspond" not in str(exc):
                raise
            log.warning(
                "a secondary does not have %s's watermark index yet; this run reads the primary",
                self.collection,
            )
            self.coll = self.coll.with_options(read_preference=ReadPreference.PRIMARY)
            return read()

    def read_main(self, bounds: ReadBounds) -> None:
        """Stream documents past `bounds` in batches. After a transient error the cursor is
        reopened at the last stored position (documents read but not stored are re-read);
        only failures without a batch stored in between count towards giving up."""

        def from_last_stored() -> None:
            wm = self.watermark
            start = (
                bounds
                if wm is None
                else ReadBounds(wm.updated_at_ms, wm.id_value(), bounds.upper_ms)
            )
            self._read_batches(start)

        mongo_call(self.settings, from_last_stored, progress=lambda: self.batch_no)

    def sweep_undatable(self, upper_ms: int) -> None:
        """Reject, once, documents the main read cannot reach: `updated_at` missing or not a
        date, or further in the future than `max_future_seconds`. Ids already in
        `raw.rejects` are skipped, so a quiet collection costs two empty index probes."""
        proj = projection(self.collection)
        for cursor in undatable_cursors(self.coll, proj, upper_ms, self.shard.mongo_filter()):
            buf: list[dict[str, Any]] = []
            for doc in cursor:
                buf.append(doc)
                if len(buf) >= self.batch_size:
                    self.reject_new(buf, upper_ms)
                    buf = []
            self.reject_new(buf, upper_ms)

    def reject_new(self, docs: list[dict[str, Any]], upper_ms: int) -> None:
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
    shard: Shard = UNSHARDED,
) -> SyncResult:
    """Load what changed in `collection` since its watermark into `raw.<collection>`.

    `full_refresh` empties `raw.<collection>`, its rows in `raw.rejects` and its watermark first,
    and marks the downstream models for a full rebuild; so does a replaced source collection
    (see `loader.identity`), without being asked. `clients`: reuse open connections (one pair
    per process run); opened and closed here if None. `before_insert(n)` is called before batch
    n's first write to ClickHouse, `after_insert` after each batch is stored and before its
    watermark is saved, `progress.advance` after the watermark is saved (tests inject crashes
    and server faults at these points, on whichever decoder path the batch takes).
    `shard`: load only its share of the documents, from its own watermark (`loader.shards`).
    Raises `ServerUnavailable` when a server stays unreachable.
    """
    require_collection(collection)
    if full_refresh and shard.sharded:
        raise ValueError(
            f"--full-refresh empties raw.{collection} for every shard: run it without --shard "
            f"(one unsharded run), then start the {shard.count} shard workers"
        )
    size = batch_size or settings.batch_size
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        run = LoadRun(cl, collection, size, after_insert, progress, before_insert, shard)
        rec = run.record
        ch = cl.clickhouse
        before: Watermark | None = None

        def failed(exc: BaseException) -> str:
            # Say whether the watermark moved: batches stored before the failure moved it.
            after, moved = watermark_outcome(collection, before, run.watermark)
            rec.watermark_after = after.describe() if after else rec.watermark_before
            message = failure_message(exc, moved)
            add_note(exc, moved)
            return message

        with recorded_run(cl, rec, run.rss, on_failure=failed):
            overlap_ms = int(settings.overlap_seconds * 1000)
            before = clickhouse_call(
                settings, lambda: start_watermark(ch, collection, shard, overlap_ms)
            )
            rec.watermark_before = before.describe() if before else ""
            # Before the index is ensured: creating it would create a missing collection.
            identity = _identity(cl, collection, full_refresh)
            rec.index_created = prepare_collection(cl, collection)
            if identity.replaced and shard.sharded:
                # Each shard would empty the table again under the others' feet.
                raise ValueError(
                    f"{identity.describe_replacement()}; shard {shard} does not reload it: "
                    f"run one sync without --shard, then start the shard workers again"
                )
            if full_refresh or identity.replaced:
                if identity.replaced:
                    log.warning("%s", identity.describe_replacement())
                    rec.source_replaced = identity.describe_replacement()
                clickhouse_call(
                    settings,
                    lambda: mark_build_pending(ch, collection, run.run_id, full_refresh=True),
                )
                run.marked_pending = True
                truncate_collection(cl, collection, reset_change_stream=identity.replaced)
                before = None  # the rebuilt table is read from the beginning
            if identity.current and identity.current != identity.recorded:
                record_identity(cl, collection, identity.current, run.run_id)
            run.read_started_ms = now_ms()
            bounds = read_bounds(
                before, settings.overlap_seconds, settings.max_future_seconds, run.read_started_ms
            )
            if progress:
                total = run.hinted(
                    lambda: mongo_call(
                        settings,
                        lambda: run.coll.count_documents(
                            bounds.mongo_filter() | shard.mongo_filter(), hint=WATERMARK_INDEX
                        ),
                    )
                )
                progress.start(collection, total)
            run.hinted(lambda: run.read_main(bounds))
            run.hinted(lambda: run.sweep_undatable(bounds.upper_ms))
            after = run.watermark or before
            rec.watermark_after = after.describe() if after else ""
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
            if rec.index_created:
                notes.append(f"created index {WATERMARK_INDEX_NAME}")
            if full_refresh:
                notes.append("full refresh")
            rec.finish(RunStatus.ok, "; ".join(notes))
        return rec


def _identity(clients: Clients, collection: str, full_refresh: bool) -> Identity:
    """The source's identity; a full refresh may proceed on a collection that is gone."""
    if full_refresh:
        return Identity(collection, collection_uuid(clients, collection), "")
    return check_identity(clients, collection)


def truncate_collection(clients: Clients, collection: str, *, reset_change_stream: bool) -> None:
    """Empty `raw.<collection>`, its rejects and its watermarks (a full refresh, a reload)."""
    ch = clients.clickhouse
    cluster = clients.settings.clickhouse_cluster  # on a cluster: the local tables, every shard

    def go() -> None:
        ch.command(f"TRUNCATE TABLE IF EXISTS {mutation_target(raw_table(collection), cluster)}")
        ch.command(
            f"DELETE FROM {mutation_target(REJECTS, cluster)} WHERE collection = {{c:String}}",
            parameters={"c": collection},
        )
        reset_watermark(ch, collection)
        # An unfinished snapshot plan would resume over the emptied table and skip what its
        # ranges had stored (`loader.snapshot`).
        ch.command(
            f"DELETE FROM {mutation_target(SNAPSHOT_RANGES, cluster)} "
            "WHERE collection = {c:String}",
            parameters={"c": collection},
        )

    clickhouse_call(clients.settings, go)
    if reset_change_stream:
        # The stored resume token belongs to the old collection's stream.
        save_resume_token(clients, collection, None, 0)
