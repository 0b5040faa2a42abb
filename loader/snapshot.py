"""The initial snapshot of a large collection, split by `_id` range over N workers.

Hash shards (`loader.shards`) make every worker walk the whole watermark index; a snapshot
split by `_id` range has each worker scan only its own part of the `_id` index, so MongoDB
reads each document once. The steps:

1. Plan (`plan_snapshot`): note the start time, then open the collection's change stream and
   store its position in `ops.change_stream_state` (the follower's resume point) *before any
   read*; then choose N-1 split points of `_id` (quantiles of a `$sample`) and store the N
   ranges in `ops.snapshot_ranges`.
2. Each range (`load_range`) reads `_id` in `[lower, upper)` in index order with
   `hint({_id: 1}).min(...).max(...)`: index bounds have no type bracketing, so ranges cover
   ids of every BSON type (a `{$gte: ObjectId}` filter would match ObjectIds only). Documents
   are mapped and stored as the sync stores them (`sync.LoadRun.store_docs`); after each batch is
   in ClickHouse the range saves the last `_id` stored, so a killed worker resumes there.
3. When every range is done (`finish_snapshot`, run by whichever worker ends last), the
   unsharded watermark is written at the start time minus the overlap window, so the next
   `sync` reads only what changed since the snapshot began.

A write during the snapshot lands after the stored resume point: `python -m loader watch
--all-changes` (or the service's follower) replays it even when its range was read before the
write, and the next `sync` reads it too (its `updated_at` is past the watermark). Deletes during
the snapshot only the follower (or `reconcile`) can see, as for any load; one the follower
replays before the range stores the document leaves a bare tombstone (`loader.store`), which
the older copy stored after it does not outrank.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import bson
from bson import MaxKey, MinKey, ObjectId
from bson.datetime_ms import DatetimeMS
from pymongo.cursor import Cursor

from loader.build_pending import mark_build_pending
from loader.clients import Clients, clickhouse_call, mongo_call, open_clients
from loader.identity import check_identity, record_identity
from loader.mapping import CODEC_OPTIONS
from loader.runs import RunStatus
from loader.schema import SNAPSHOT_RANGES, require_collection
from loader.settings import Settings
from loader.snapshot_ranges import (
    RangeSpec,
    decode_id,
    encode_id,
    ranges_from_points,
    split_points,
)
from loader.store import recorded_run, save_resume_token
from loader.sync import (
    LoadRun,
    SyncResult,
    prepare_clients,
    prepare_collection,
    projection,
    truncate_collection,
)
from loader.watermark import Watermark, load_watermarks, now_ms, save_watermark

log = logging.getLogger(__name__)

ID_INDEX = [("_id", 1)]
SAMPLE_PER_RANGE = 200  # sampled ids per range: quantiles within about 1/200 of a range
MIN_SAMPLE = 2_000


class SnapshotRefused(ValueError):
    """The snapshot would overwrite or conflict with a load already made; the message says
    what to run instead."""


# -- state in ops.snapshot_ranges --------------------------------------------------------------
@dataclass(frozen=True)
class RangeState:
    """A range of a plan as last saved. Bounds are `encode_id` text; "" is open (from the
    lowest, to the highest key) and "-" on both marks an empty range."""

    plan_id: str
    workers: int
    index: int
    lower: str
    upper: str
    last_id: str  # encoded last `_id` stored, "" = none yet
    docs: int
    done: bool
    started_ms: int

    @property
    def empty(self) -> bool:
        return self.lower == self.upper == "-"


def _save_range(clients: Clients, st: RangeState, run_id: str) -> None:
    cols = [n for n, _ in SNAPSHOT_RANGES.columns if n != "saved_at"]
    sql = (
        f"INSERT INTO {SNAPSHOT_RANGES.qualified} ({', '.join(cols)}, saved_at) SELECT "
        "{c:String}, {p:String}, {w:UInt16}, {k:UInt16}, {lo:String}, {hi:String}, "
        "{last:String}, {docs:UInt64}, {done:UInt8}, fromUnixTimestamp64Milli({s:Int64}, 'UTC'), "
        "{run:String}, now64(6)"
    )
    params = {
        "c": _collection_of(st),
        "p": st.plan_id,
        "w": st.workers,
        "k": st.index,
        "lo": st.lower,
        "hi": st.upper,
        "last": st.last_id,
        "docs": st.docs,
        "done": int(st.done),
        "s": st.started_ms,
        "run": run_id,
    }
    clickhouse_call(clients.settings, lambda: clients.clickhouse.command(sql, parameters=params))


def _collection_of(st: RangeState) -> str:
    return st.plan_id.split("#", 1)[0]


def load_plan(clients: Clients, collection: str) -> list[RangeState]:
    """The latest plan of `collection` (its ranges' latest states), [] when none."""
    sql = (
        "SELECT plan_id, workers, range_index, argMax(lower, saved_at), argMax(upper, saved_at), "
        "argMax(last_id, saved_at), argMax(docs, saved_at), argMax(done, saved_at), "
        "toUnixTimestamp64Milli(any(started_at)) "
        f"FROM {SNAPSHOT_RANGES.qualified} WHERE collection = {{c:String}} AND plan_id = ("
        f"SELECT argMax(plan_id, saved_at) FROM {SNAPSHOT_RANGES.qualified} "
        "WHERE collection = {c:String}) GROUP BY plan_id, workers, range_index "
        "ORDER BY range_index"
    )
    rows = clickhouse_call(
        clients.settings,
        lambda: clients.clickhouse.query(sql, parameters={"c": collection}).result_rows,
    )
    return [
        RangeState(str(p), int(w), int(k), str(lo), str(hi), str(last), int(d), bool(done), int(s))
        for p, w, k, lo, hi, last, d, done, s in rows
    ]


def never_loaded(clients: Clients, collection: str) -> bool:
    """No watermark of any key (unsharded or shard): the first load, or an unfinished
    snapshot (which writes the watermark only once every range is done)."""
    marks = clickhouse_call(
        clients.settings, lambda: load_watermarks(clients.clickhouse, collection)
    )
    return not marks


# -- step 1: the plan --------------------------------------------------------------------------
def take_resume_point(clients: Clients, collection: str) -> Any:
    """Open the collection's change stream and store its position (the resume token of the
    empty first batch) as the follower's: every write after this is replayed from there."""
    coll = clients.db[collection]

    def open_and_close() -> Any:
        with coll.watch(max_await_time_ms=1) as stream:
            return stream.resume_token

    token = mongo_call(clients.settings, open_and_close)
    save_resume_token(clients, collection, token, 0)
    return token


def sample_split_points(clients: Clients, collection: str, workers: int) -> list[Any]:
    """N-1 split points from a `$sample` of ids, deduplicated and sorted by the server (which
    orders mixed BSON types the way the `_id` index does)."""
    if workers == 1:
        return []
    size = max(MIN_SAMPLE, SAMPLE_PER_RANGE * workers)
    pipeline: list[dict[str, Any]] = [
        {"$sample": {"size": size}},
        {"$group": {"_id": "$_id"}},  # $sample may return a document twice
        {"$sort": {"_id": 1}},
    ]
    coll = clients.db[collection]
    ids = mongo_call(
        clients.settings,
        lambda: [d["_id"] for d in coll.aggregate(pipeline, allowDiskUse=True)],
    )
    return split_points(ids, workers)


def plan_snapshot(
    settings: Settings,
    collection: str,
    workers: int,
    *,
    reload: bool = False,
    clients: Clients | None = None,
) -> list[RangeState]:
    """Take the resume point, choose the split points and store the plan of `workers` ranges.

    Refused (`SnapshotRefused`) when the collection already has a watermark, unless `reload`,
    which empties `raw.<collection>` first as `sync --full-refresh` does. An unfinished plan of
    the same number of ranges is returned as it is (its workers resume)."""
    require_collection(collection)
    if workers < 1:
        raise ValueError(f"--workers {workers}: a snapshot needs at least one worker")
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        current = load_plan(cl, collection)
        unfinished = bool(current) and not all(r.done for r in current)
        if unfinished and not reload:
            if current[0].workers == workers:
                return current
            raise SnapshotRefused(
                f"an unfinished snapshot of {collection} in {current[0].workers} ranges exists: "
                f"run `python -m loader snapshot --collection {collection} "
                f"--workers {current[0].workers}` to finish it, or add --reload to start over"
            )
        if not reload and not never_loaded(cl, collection):
            marks = load_watermarks(cl.clickhouse, collection)
            raise SnapshotRefused(
                f"{collection} is already loaded (ops.watermarks holds "
                f"{', '.join(sorted(marks))}): run `python -m loader sync --collection "
                f"{collection}` to load what changed, or `python -m loader snapshot "
                f"--collection {collection} --workers {workers} --reload` to empty "
                f"raw.{collection} and load it all again"
            )
        identity = check_identity(cl, collection)
        prepare_collection(cl, collection)  # the sync after the snapshot needs its index
        run_id = uuid.uuid4().hex
        if reload or identity.replaced:
            clickhouse_call(
                settings,
                lambda: mark_build_pending(cl.clickhouse, collection, run_id, full_refresh=True),
            )
            truncate_collection(cl, collection, reset_change_stream=True)
        if identity.current and identity.current != identity.recorded:
            record_identity(cl, collection, identity.current, run_id)
        # The start time first, then the stream position, then any read: a write the ranges
        # miss is after both, so the follower replays it and the next sync reads it.
        started_ms = now_ms()
        take_resume_point(cl, collection)
        points = sample_split_points(cl, collection, workers)
        plan_id = f"{collection}#{run_id}"
        states = []
        for k, r in enumerate(ranges_from_points(points, workers)):
            lo = "-" if r.empty else ("" if r.lower is None else encode_id(r.lower))
            hi = "-" if r.empty else ("" if r.upper is None else encode_id(r.upper))
            st = RangeState(plan_id, workers, k, lo, hi, "", 0, False, started_ms)
            _save_range(cl, st, run_id)
            states.append(st)
        log.info("snapshot plan %s: %d ranges, split at %s", plan_id, workers, points)
        return states


# -- step 2: one range -------------------------------------------------------------------------
@dataclass(frozen=True)
class RangeBatch:
    """Passed to `after_batch`: a batch of the range is stored and its progress saved."""

    spec: RangeSpec
    batch_no: int
    last_id: Any


def range_cursor(run: LoadRun, st: RangeState, batch_size: int, *, raw: bool) -> Cursor:
    """The range's documents in `_id` order, after its saved progress. Index bounds (`min`
    and `max` on the hinted `_id` index) compare across BSON types; a query filter would
    bracket by type. `raw`: server batches as BSON bytes (`find_raw_batches`)."""
    start: Any = decode_id(st.last_id or st.lower) if (st.last_id or st.lower) else MinKey()
    end: Any = decode_id(st.upper) if st.upper else MaxKey()
    # `min` is inclusive: the last stored document is left out by the filter.
    flt = {"_id": {"$ne": decode_id(st.last_id)}} if st.last_id else {}
    find = run.coll.find_raw_batches if raw else run.coll.find
    # The last range stops at MaxKey, exclusive: an `_id` cannot be MaxKey, so none is missed.
    cursor = find(flt, projection(run.collection)).hint(ID_INDEX)
    return cursor.min([("_id", start)]).max([("_id", end)]).batch_size(batch_size)


def load_range(
    settings: Settings,
    collection: str,
    spec: RangeSpec,
    *,
    batch_size: int | None = None,
    clients: Clients | None = None,
    after_batch: Callable[[RangeBatch], None] | None = None,
    before_insert: Callable[[RangeSpec, int], None] | None = None,
) -> SyncResult:
    """Load range `spec` of the collection's current plan, from its saved progress; when it
    is the last range to finish, `finish_snapshot`. Recorded in `ops.sync_runs` (shard
    `snapshot k/N`). `before_insert(spec, n)` runs before batch n's first write, `after_batch`
    once a batch is stored and its progress saved (tests inject crashes there)."""
    require_collection(collection)
    size = batch_size or settings.batch_size
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        plan = load_plan(cl, collection)
        if not plan or plan[0].workers != spec.count:
            have = f"a plan of {plan[0].workers} ranges" if plan else "no plan"
            raise SnapshotRefused(
                f"range {spec} has no plan to follow ({collection} has {have}): run "
                f"`python -m loader snapshot --collection {collection} --workers {spec.count} "
                "--plan` once first, then the N range workers"
            )
        st = plan[spec.index]
        hook = (lambda n: before_insert(spec, n)) if before_insert else None
        run = LoadRun(cl, collection, size, None, None, before_insert=hook)
        rec = run.record
        rec.shard = spec.label
        rec.watermark_before = st.last_id
        with recorded_run(cl, rec, run.rss):
            run.read_started_ms = now_ms()
            if not st.done and not st.empty:
                st = _read_range(run, st, spec, size, after_batch)
            elif not st.done:
                st = _mark(cl, st, run.run_id, done=True)
            rec.watermark_after = st.last_id
            if rec.docs_read != rec.rows_written + rec.rejects:
                raise AssertionError(
                    f"accounting error: read {rec.docs_read} != written {rec.rows_written} "
                    f"+ rejected {rec.rejects}"
                )
            finished = finish_snapshot(cl, collection, st.plan_id, run.run_id)
            rec.finish(
                RunStatus.ok,
                f"{spec.label} of plan {st.plan_id}"
                + ("; snapshot complete, watermark written" if finished else ""),
            )
        return rec


def _mark(cl: Clients, st: RangeState, run_id: str, **changes: Any) -> RangeState:
    new = RangeState(**{**st.__dict__, **changes})
    _save_range(cl, new, run_id)
    return new


def _read_range(
    run: LoadRun,
    st: RangeState,
    spec: RangeSpec,
    size: int,
    after_batch: Callable[[RangeBatch], None] | None,
) -> RangeState:
    """Store the range batch by batch, saving its progress after each; reopened at the last
    stored `_id` after a transient error."""
    state = st
    upper_ms = run.read_started_ms + int(run.settings.max_future_seconds * 1000)
    raw = run.settings.decoder == "pymongoarrow"

    def from_last_stored() -> None:
        nonlocal state
        # `with`: a failed pass closes its server cursor at once (see `LoadRun._read_batches`).
        with range_cursor(run, state, size, raw=raw) as cursor:
            for docs, last in _stored_batches(run, cursor, upper_ms):
                state = _mark(
                    run.clients, state, run.run_id, last_id=encode_id(last), docs=state.docs + docs
                )
                run.batch_no += 1
                if after_batch:
                    after_batch(RangeBatch(spec, run.batch_no, last))

    mongo_call(run.settings, from_last_stored, progress=lambda: run.batch_no)
    return _mark(run.clients, state, run.run_id, done=True)


def _stored_batches(run: LoadRun, cursor: Cursor, upper_ms: int) -> Iterator[tuple[int, Any]]:
    """Store the cursor's documents batch by batch (one server batch at a time when raw,
    `LOADER_DECODER=pymongoarrow`); yields each stored batch's size and last `_id`."""
    if run.settings.decoder == "pymongoarrow":
        for raw in cursor:
            table = run.store_valid_rows(raw, upper_ms)
            if table is not None:
                rows = table.num_rows
                run.record.docs_read += rows
                run.record.rows_written += rows
                yield rows, ObjectId(table["_id"][-1].as_py())
                continue
            docs = bson.decode_all(raw, CODEC_OPTIONS)
            if docs:
                _store(run, docs, upper_ms)
                yield len(docs), docs[-1]["_id"]
        return
    buf: list[dict[str, Any]] = []
    for doc in cursor:
        buf.append(doc)
        if len(buf) >= run.batch_size:
            _store(run, buf, upper_ms)
            yield len(buf), buf[-1]["_id"]
            buf = []
    if buf:
        _store(run, buf, upper_ms)
        yield len(buf), buf[-1]["_id"]


def _store(run: LoadRun, docs: list[dict[str, Any]], upper_ms: int) -> None:
    """Store a batch as the sync does: rows, and rejects with their reasons. A document dated
    past LOADER_MAX_FUTURE_SECONDS is rejected as the sync's sweep rejects it (the sync loads
    it once its date has come)."""
    future = [
        d
        for d in docs
        if type(d.get("updated_at")) is DatetimeMS and int(d["updated_at"]) > upper_ms
    ]
    if future:
        far = {id(d) for d in future}
        docs = [d for d in docs if id(d) not in far]
        run.reject_new(future, upper_ms)
    if docs:
        batch = run.store_docs(docs)
        run.record.docs_read += len(docs)
        run.record.rows_written += batch.rows
        run.record.rejects += len(batch.rejects)
    run.rss.sample()


# -- step 3: the watermark ---------------------------------------------------------------------
def finish_snapshot(clients: Clients, collection: str, plan_id: str, run_id: str) -> bool:
    """When every range of the plan is done, write the unsharded watermark at the snapshot's
    start minus the overlap (the next sync reads what changed since); True once written.
    Idempotent: every worker that ends may call it, the watermark never moves back."""
    plan = load_plan(clients, collection)
    if not plan or plan[0].plan_id != plan_id or not all(r.done for r in plan):
        return False
    started = plan[0].started_ms
    overlap_ms = int(clients.settings.overlap_seconds * 1000)
    wm = Watermark(started - overlap_ms, "", started)
    clickhouse_call(
        clients.settings, lambda: save_watermark(clients.clickhouse, collection, wm, run_id)
    )
    return True


# -- all ranges from one command ---------------------------------------------------------------
def _range_in_process(
    settings: Settings, collection: str, spec: RangeSpec, size: int
) -> SyncResult:
    return load_range(settings, collection, spec, batch_size=size)


def run_snapshot(
    settings: Settings,
    collection: str,
    workers: int,
    *,
    reload: bool = False,
    processes: bool = True,
    batch_size: int | None = None,
    clients: Clients | None = None,
    after_batch: Callable[[RangeBatch], None] | None = None,
    before_insert: Callable[[RangeSpec, int], None] | None = None,
) -> list[SyncResult]:
    """Plan (or resume the unfinished plan), then load the `workers` ranges at once: in
    processes of their own (the default: mapping is CPU-bound and a process has its own GIL)
    or in threads sharing `clients` (the hooks of `load_range` reach threads only)."""
    size = batch_size or settings.batch_size
    with open_clients(settings, clients) as cl:
        plan_snapshot(settings, collection, workers, reload=reload, clients=cl)
        specs = [RangeSpec(k, workers) for k in range(workers)]
        pool: Executor
        if processes:
            # spawn: a forked child would inherit the parent's MongoClient, which is not
            # fork-safe.
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
            with pool:
                futures = [
                    pool.submit(_range_in_process, settings, collection, s, size) for s in specs
                ]
                return [f.result() for f in futures]
        with ThreadPoolExecutor(workers) as pool:
            futures = [
                pool.submit(
                    load_range,
                    settings,
                    collection,
                    s,
                    batch_size=size,
                    clients=cl,
                    after_batch=after_batch,
                    before_insert=before_insert,
                )
                for s in specs
            ]
            return [f.result() for f in futures]
