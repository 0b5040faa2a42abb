"""The write layer that sync, the change-stream follower and reconcile share.

Rows into `raw.<collection>` (one Arrow batch per call), rejects into `raw.rejects`, tombstones
for deleted documents, the change stream's position in `ops.change_stream_state`, and the run
records of `ops.sync_runs`. Every write goes through `clickhouse_call` (retried on transient
errors); what to write and when is the caller's business.

A tombstone is a copy of the last stored row with `is_deleted = 1` and a higher `_version`
(`max(deleted_at_ms, last _version + 1)`), so the last known values stay in the table as history.
A deleted id raw has no row of yet gets a bare tombstone (the id, `_version` = the deletion time,
empty values): a load that read the document before it was deleted (a sync or a snapshot range
running beside the follower) may store it after the follower replays the delete, and its older
`_version` then loses to the tombstone instead of bringing the document back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from bson import json_util

from loader.clients import Clients, clickhouse_call, mongo_call
from loader.cluster import arrow_payload, insert_settings, rows_payload, statement_payload
from loader.idset import id_set
from loader.mapping import MappedBatch, dump_document, id_to_str, to_arrow
from loader.runs import PeakRss, RunRecord, RunStatus, write_run
from loader.schema import CHANGE_STREAM_STATE, REJECTS, raw_columns, raw_table
from loader.watermark import now_ms

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

TOMBSTONE_CHUNK = 50_000  # ids per INSERT ... SELECT: bounded server memory
FEW_TOMBSTONES = 2_000  # up to this many ids: one lookup by primary key and one insert


# -- raw rows and rejects ----------------------------------------------------------------------
def store_rows(
    clients: Clients,
    batch: MappedBatch,
    run_id: str,
    on_built: Callable[[], Any] | None = None,
    tombstones: Sequence[Sequence[Any]] = (),
) -> None:
    """Insert the batch's rows into `raw.<collection>` as one Arrow batch; `tombstones`
    (`tombstone_rows`' rows) go in the same insert."""
    if not batch.rows:
        return
    table = to_arrow(batch, run_id, now_ms())
    if tombstones:
        import pyarrow as pa

        table = pa.concat_tables([table, _rows_table(table.schema, tombstones)])
    if on_built:
        on_built()
    store_table(clients, batch.collection, table)


def _rows_table(schema: pa.Schema, rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Rows in `raw_columns` order as an Arrow table of `schema` (the same columns)."""
    import pyarrow as pa

    columns = list(zip(*rows, strict=True))
    return pa.table(
        [pa.array(values, f.type) for f, values in zip(schema, columns, strict=True)],
        schema=schema,
    )


def store_table(clients: Clients, collection: str, table: pa.Table) -> None:
    """Insert rows in `raw.<collection>` column order (see `mapping.with_bookkeeping`)."""
    ch = clients.clickhouse
    name = raw_table(collection).qualified
    # In cluster mode a retried batch carries the same token and is stored once.
    dedup = insert_settings(clients.settings.clickhouse_cluster, name, arrow_payload(table))
    clickhouse_call(clients.settings, lambda: ch.insert_arrow(name, table, settings=dedup))


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
    rows = []
    for r in batch.rejects:
        key = id_to_str(r.id)
        rows.append((key, r.reason, dump_document(full.get(key, r.doc))))
    insert_rejects(clients, batch.collection, rows, run_id)


def insert_rejects(
    clients: Clients,
    collection: str,
    rows: list[tuple[str, str, str]],
    run_id: str,
    *,
    deleted: bool = False,
) -> None:
    """Append `(hex id, reason, document JSON)` rows to `raw.rejects`; `deleted` marks ids
    whose document is gone from MongoDB (they no longer count as accounted for)."""
    if not rows:
        return
    now = datetime.now(UTC)
    flag = int(deleted)
    values = [[collection, key, reason, doc, run_id, now, flag] for key, reason, doc in rows]
    ch = clients.clickhouse
    names = [n for n, _ in REJECTS.columns]
    dedup = insert_settings(
        clients.settings.clickhouse_cluster, REJECTS.qualified, rows_payload(names, values)
    )
    clickhouse_call(
        clients.settings,
        lambda: ch.insert(REJECTS.qualified, values, column_names=names, settings=dedup),
    )


# -- tombstones --------------------------------------------------------------------------------
def write_tombstones(
    clients: Clients, collection: str, deleted: dict[str, int], run_id: str
) -> int:
    """Tombstone every id in `deleted` (hex id → deletion time in ms) that raw does not show
    deleted already: a copy of its live row, or a bare tombstone when raw has no row of it
    (see the module docstring).

    Ids already tombstoned are skipped, which makes replaying the same delete events harmless.
    The ids travel as an id set (request body), so any number works; many are written by
    `INSERT ... SELECT`s per chunk with server-side parameters. Returns the number of
    tombstones written."""
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
    params = {"run": run_id}
    items = list(deleted.items())
    for start in range(0, len(items), TOMBSTONE_CHUNK):
        with id_set(clients, items[start : start + TOMBSTONE_CHUNK]) as ids:
            # The filter sits in a subquery: in ClickHouse a SELECT alias (`1 AS is_deleted`)
            # would shadow the column of the same name in a WHERE at the same level.
            live = (
                f"SELECT *, _version AS prev_version FROM {table} FINAL "
                f"WHERE _id IN {ids.keys()} AND is_deleted = 0"
            )
            insert = (
                f"INSERT INTO {table} ({cols}) SELECT {select} FROM ({live}) AS live "
                f"INNER JOIN {ids.pairs()} AS deleted ON live._id = deleted.key"
            )
            unknown = (
                f"SELECT key, value FROM {ids.pairs()} "
                f"WHERE key NOT IN (SELECT _id FROM {table} WHERE _id IN {ids.keys()})"
            )
            bare = (
                f"INSERT INTO {table} (`_id`, `is_deleted`, `_version`, `_loaded_at`, `_run_id`) "
                "SELECT key, toUInt8(1), toUInt64(value), now64(3, 'UTC'), {run:String} "
                f"FROM ({unknown})"
            )
            for statement, rows in ((insert, live), (bare, unknown)):
                written += _insert_counted(clients, table, statement, rows, params, ids.settings)
    return written


def _insert_counted(
    clients: Clients,
    table: str,
    insert: str,
    rows: str,
    params: dict[str, Any],
    settings: dict[str, Any],
) -> int:
    """Run `insert` into `table` (an INSERT ... SELECT of the rows `rows` selects) when there
    are any; returns how many."""
    dedup = insert_settings(
        clients.settings.clickhouse_cluster, table, statement_payload(insert, params)
    )
    ch = clients.clickhouse

    def go() -> int:
        n = int(cast(int, ch.command(f"SELECT count() FROM ({rows})", settings=settings)))
        if n:
            ch.command(insert, parameters=params, settings={**dedup, **settings})
        return n

    return clickhouse_call(clients.settings, go)


def _write_few_tombstones(
    clients: Clients, collection: str, deleted: dict[str, int], run_id: str
) -> int:
    """`write_tombstones` for a change-stream batch: `tombstone_rows`, then one insert of
    them (`insert_tombstones`). Same rows as the INSERT ... SELECT path."""
    return insert_tombstones(
        clients, collection, tombstone_rows(clients, collection, deleted, run_id)
    )


def tombstone_rows(
    clients: Clients, collection: str, deleted: dict[str, int], run_id: str
) -> list[list[Any]]:
    """The tombstones of the ids in `deleted` (at most `FEW_TOMBSTONES`) that raw does not show
    deleted: the latest row of each id by primary key (the ids as a query parameter; no FINAL,
    which merges every part of the table) marked deleted, and a bare tombstone for each id raw
    has no row of. A lookup only: the caller may run it on another connection while it writes
    the batch's rows."""
    table = raw_table(collection).qualified
    columns = raw_columns(collection)
    names = [n for n, _ in columns]
    cols = ", ".join(f"`{n}`" for n in names)
    ch = clients.clickhouse
    latest = (
        f"SELECT {cols} FROM {table} WHERE _id IN {{ids:Array(String)}} "
        "ORDER BY _id, _version DESC LIMIT 1 BY _id"
    )
    stored = clickhouse_call(
        clients.settings,
        lambda: ch.query(latest, parameters={"ids": list(deleted)}).result_rows,
    )
    at = {n: i for i, n in enumerate(names)}
    loaded_at = datetime.fromtimestamp(now_ms() / 1000, UTC)
    rows = []
    for row in stored:
        if row[at["is_deleted"]]:
            continue
        tomb = list(row)
        tomb[at["is_deleted"]] = 1
        tomb[at["_version"]] = max(int(row[at["_version"]]) + 1, deleted[row[at["_id"]]])
        tomb[at["_loaded_at"]] = loaded_at
        tomb[at["_run_id"]] = run_id
        rows.append(tomb)
    known = {row[at["_id"]] for row in stored}
    for _id, deleted_at in deleted.items():
        if _id not in known:
            bare = {"_id": _id, "is_deleted": 1, "_version": deleted_at, "_loaded_at": loaded_at}
            bare["_run_id"] = run_id
            rows.append([bare.get(n, _empty(t)) for n, t in columns])
    return rows


def _empty(ch_type: str) -> Any:
    """The value of a bare tombstone's column of type `ch_type`: what ClickHouse fills in for a
    column an insert leaves out."""
    if "String" in ch_type:
        return ""
    if ch_type.startswith("DateTime"):
        return datetime.fromtimestamp(0, UTC)
    return 0


def insert_tombstones(clients: Clients, collection: str, rows: list[list[Any]]) -> int:
    """Insert `tombstone_rows`' rows into `raw.<collection>`; returns how many."""
    if not rows:
        return 0
    table = raw_table(collection).qualified
    names = [n for n, _ in raw_columns(collection)]
    ch = clients.clickhouse
    dedup = insert_settings(clients.settings.clickhouse_cluster, table, rows_payload(names, rows))
    clickhouse_call(
        clients.settings, lambda: ch.insert(table, rows, column_names=names, settings=dedup)
    )
    return len(rows)


# -- change-stream position --------------------------------------------------------------------
def load_resume_token(clients: Clients, collection: str) -> Any:
    """The last saved resume token of `collection`'s change stream; None: start from now."""
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
    """Append the stream position (None: forget it, the next follower starts from now)."""
    text = json_util.dumps(token, json_options=json_util.CANONICAL_JSON_OPTIONS) if token else ""
    sql = (
        f"INSERT INTO {CHANGE_STREAM_STATE.qualified} "
        "(collection, resume_token, events, saved_at, lag_seconds, last_event_at) "
        "SELECT {c:String}, {t:String}, {n:UInt64}, now64(6), {lag:Float64}, "
        "if({last:Int64} < 0, NULL, fromUnixTimestamp64Milli({last:Int64}, 'UTC'))"
    )
    params = {
        "c": collection,
        "t": text,
        "n": events,
        "lag": max(0.0, lag_seconds),
        "last": -1 if last_event_ms is None else last_event_ms,
    }
    # The token binds the call's time too: saving the same position again later (a reload
    # forgetting the stream twice) is a new row, only a retry of this call is the same one.
    payload = statement_payload(sql, {**params, "called_at": time.time_ns()})
    dedup = insert_settings(
        clients.settings.clickhouse_cluster, CHANGE_STREAM_STATE.qualified, payload
    )
    clickhouse_call(
        clients.settings,
        lambda: clients.clickhouse.command(sql, parameters=params, settings=dedup),
    )


# -- run records -------------------------------------------------------------------------------
def write_run_or_log(clients: Clients, rec: RunRecord) -> None:
    """Write a run record where an error is already on its way: log a failure, never raise."""
    try:
        write_run(clients.clickhouse, rec)
    except Exception as exc:  # noqa: BLE001 - the original error matters more
        log.error("could not record failed run %s in ops.sync_runs: %s", rec.run_id, exc)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def recorded_run(
    clients: Clients,
    rec: RunRecord,
    rss: PeakRss,
    *,
    on_failure: Callable[[BaseException], str] = _describe,
) -> Iterator[RunRecord]:
    """Write `rec` to `ops.sync_runs` when the block ends, with the run's peak memory.

    The block finishes `rec` when it succeeds. When it raises, `rec` is finished as failed with
    `on_failure(exc)` as its message (the place to add notes to `exc` too), written without
    masking the error, and the error goes on."""
    try:
        yield rec
    except BaseException as exc:
        rec.peak_rss_bytes = rss.peak
        rec.finish(RunStatus.failed, on_failure(exc))
        write_run_or_log(clients, rec)
        raise
    rec.peak_rss_bytes = rss.peak
    clickhouse_call(clients.settings, lambda: write_run(clients.clickhouse, rec))
