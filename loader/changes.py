"""Would a sync of a collection change anything? (`has_changes`, the flow's `detect_changes`)

A sync reads every document past the watermark `(updated_at, _id)`; while the previous run is
less than `LOADER_OVERLAP_SECONDS` old it also re-reads that window, in case a write stamped
inside it committed late (see `loader.watermark`). Asking only "does the read find a
document?" therefore answers yes for a whole minute after any write, and every scheduled run
in that minute re-loads the window and runs a dbt build although nothing changed.

So the window is judged by content instead: the documents MongoDB holds in it are mapped as
the loader maps them and compared, value by value, with the live rows `raw.<collection>` holds
for the same window (latest version per `_id`). Anything the sync would store differently is a
change: a document not loaded yet (a late commit), one updated in place without moving its
`updated_at` (or moving it within the window), one gone from the window (deleted, or moved
back before it). A document that fails to map counts as seen when `raw.rejects` holds a live
reject of its id (re-rejecting it changes no model). Past the window, the probe is the exact
one: any document after the watermark is a change. A window found equal moves the watermark's
read start to the probe's (as a sync re-reading it would), so that the window closes after
`LOADER_OVERLAP_SECONDS` even when no sync runs, and later probes are the exact one again.
"""

from __future__ import annotations

from typing import Any

from loader.clients import Clients, clickhouse_call, mongo_call, open_clients
from loader.identity import check_identity
from loader.mapping import BatchMapper, id_to_str
from loader.schema import REJECTS, fields_of, raw_table
from loader.settings import Settings
from loader.shards import UNSHARDED, Shard, shard_starts
from loader.sync import prepare_clients, prepare_collection, projection, watermark_range
from loader.watermark import (
    ReadBounds,
    Watermark,
    load_watermark,
    now_ms,
    read_bounds,
    save_watermark,
)

Row = tuple[Any, ...]


def has_changes(
    settings: Settings, collection: str, *, clients: Clients | None = None, shards: int = 1
) -> bool:
    """True when a sync would store something: a document past the watermark, a window that
    differs from raw (see the module docstring), or a replaced collection (the sync reloads
    it). Raises `SourceMissing` when the collection is gone while the warehouse holds
    documents of it. `shards`: the loader runs as that many shard workers, which read from
    their own marks (`_sharded_changes`), not from the unsharded one.

    Documents whose `updated_at` is not a usable date are not considered (the next sync that
    runs for another reason rejects them)."""
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        if check_identity(cl, collection).replaced:
            return True
        prepare_collection(cl, collection)
        if shards > 1:
            return _sharded_changes(cl, collection, shards)
        wm = clickhouse_call(settings, lambda: load_watermark(cl.clickhouse, collection))
        now = now_ms()
        found, window = _probe_mark(cl, collection, wm, now)
        if found or window is None:
            return found
        if window_differs(cl, collection, window):
            return True
        # The window holds what raw holds, as a sync reading it now would have found: move the
        # watermark's read start to now, as that sync would, so the next probe looks only
        # past the watermark once this window has passed.
        assert wm is not None  # a window is open only past a saved watermark
        verified = Watermark(wm.updated_at_ms, wm.last_id, now)
        clickhouse_call(
            settings, lambda: save_watermark(cl.clickhouse, collection, verified, "has_changes")
        )
        return False


def _sharded_changes(clients: Clients, collection: str, count: int) -> bool:
    """`has_changes` for `count` shard workers. The unsharded mark does not move while they
    run, so each shard is asked from where it would start (`shards.shard_starts`): exactly
    past its mark, for its own documents; windows still open are compared with raw as one
    (from the earliest, which holds the others). Nothing is saved: a shard's window closes
    `LOADER_OVERLAP_SECONDS` after its last read."""
    settings = clients.settings
    overlap_ms = int(settings.overlap_seconds * 1000)
    starts = clickhouse_call(
        settings, lambda: shard_starts(clients.clickhouse, collection, count, overlap_ms)
    )
    now = now_ms()
    windows: list[ReadBounds] = []
    for shard, wm in starts.items():
        found, window = _probe_mark(clients, collection, wm, now, shard)
        if found:
            return True
        if window is not None:
            windows.append(window)
    if not windows:
        return False
    return window_differs(clients, collection, min(windows, key=lambda b: b.lower_ms or 0))


def _probe_mark(
    clients: Clients,
    collection: str,
    wm: Watermark | None,
    now: int,
    shard: Shard = UNSHARDED,
) -> tuple[bool, ReadBounds | None]:
    """From one mark (`shard`'s documents): whether a document lies past it, and the re-read
    window still open behind it (None once it has passed, or when a document was found)."""
    settings = clients.settings
    bounds = read_bounds(wm, settings.overlap_seconds, settings.max_future_seconds, now)
    if wm is None or bounds.lower_id is not None:
        # Nothing loaded yet, or the window has passed: the read is past the watermark.
        return _any_document(clients, collection, bounds, shard), None
    past = ReadBounds(wm.updated_at_ms, wm.id_value(), bounds.upper_ms)
    if wm.last_id and _any_document(clients, collection, past, shard):
        return True, None  # never loaded: no need to compare the window
    return False, bounds


def _any_document(
    clients: Clients, collection: str, bounds: ReadBounds, shard: Shard = UNSHARDED
) -> bool:
    probe = watermark_range(clients.db[collection], bounds, {"_id": 1}, shard=shard).limit(1)
    return mongo_call(clients.settings, lambda: next(probe.clone(), None)) is not None


def window_differs(clients: Clients, collection: str, bounds: ReadBounds) -> bool:
    """Do MongoDB and raw hold different documents in the re-read window `bounds`?"""
    assert bounds.lower_ms is not None
    mapper = BatchMapper(collection, clients.settings.max_string_chars)
    cursor = watermark_range(clients.db[collection], bounds, projection(collection))
    for doc in mongo_call(clients.settings, lambda: list(cursor.clone())):
        mapper.add(doc)
    batch = mapper.take()
    names = [f.name for f in fields_of(collection)]
    columns = [batch.columns[n] for n in names]
    mongo_rows: dict[str, Row] = {
        i: tuple(v) for i, *v in zip(batch.columns["_id"], *columns, strict=True)
    }
    rejected = {id_to_str(r.id) for r in batch.rejects}
    floor_ms = bounds.lower_ms - int(clients.settings.max_future_seconds * 1000)
    raw_rows = _raw_window(clients, collection, bounds.lower_ms, floor_ms)
    for doc_id, row in mongo_rows.items():
        if raw_rows.get(doc_id) != row:
            return True  # not loaded, or loaded with other values
    window = set(mongo_rows) | rejected
    upper = bounds.upper_ms
    updated_at = names.index("updated_at")
    for doc_id, row in raw_rows.items():
        if doc_id not in window and bounds.lower_ms <= row[updated_at] <= upper:
            return True  # gone from the window: deleted, or moved back before it
    return bool(rejected) and not _rejects_recorded(clients, collection, rejected)


def _raw_window(clients: Clients, collection: str, lower_ms: int, floor_ms: int) -> dict[str, Row]:
    """Live rows (latest version per `_id`) of every id that has a version stamped at or after
    `lower_ms`, as the mapper's values (dates in ms, booleans 0/1)."""
    table = raw_table(collection).qualified
    fields = fields_of(collection)
    columns = ", ".join(
        f"toUnixTimestamp64Milli(`{f.name}`)" if f.kind == "datetime" else f"`{f.name}`"
        for f in fields
    )
    # A row is loaded no earlier than `max_future_seconds` before its `updated_at` (later
    # dates are not read), so `_loaded_at` (a skip index) narrows the scan soundly.
    sql = (
        f"SELECT _id, {columns} FROM {table} FINAL WHERE is_deleted = 0 AND _id IN ("
        f"SELECT _id FROM {table} WHERE _loaded_at >= fromUnixTimestamp64Milli({{floor:Int64}}) "
        "AND updated_at >= fromUnixTimestamp64Milli({lower:Int64}))"
    )
    params = {"lower": lower_ms, "floor": floor_ms}
    ch = clients.clickhouse
    rows = clickhouse_call(clients.settings, lambda: ch.query(sql, parameters=params).result_rows)
    return {str(r[0]): tuple(r[1:]) for r in rows}


def _rejects_recorded(clients: Clients, collection: str, ids: set[str]) -> bool:
    """Does `raw.rejects` hold a live reject of every id in `ids`?"""
    sql = (
        f"SELECT count() FROM (SELECT _id FROM {REJECTS.qualified} "
        "WHERE collection = {c:String} AND _id IN {ids:Array(String)} "
        "GROUP BY _id HAVING argMax(is_deleted, rejected_at) = 0)"
    )
    ch = clients.clickhouse
    found = clickhouse_call(
        clients.settings,
        lambda: ch.command(sql, parameters={"c": collection, "ids": sorted(ids)}),
    )
    return int(str(found)) == len(ids)
