"""pymongo versus pymongoarrow for the loader's batch conversion (documents → insert-ready Arrow).

Both paths read the loader's initial-load query (same filter, projection, sort, hint and batch
size) and stop where the loader would insert into ClickHouse, so only decoding and conversion
differ:
- `pymongo`: what `loader.sync` does: pymongo decodes each document into a dict,
  `BatchMapper.add` validates and appends it column by column, `to_arrow` builds the table.
- `pymongoarrow`: `find_raw_batches` hands raw BSON batches to pymongoarrow, which decodes
  them straight into Arrow columns with a fixed schema (`allow_invalid`: a value of the wrong
  type becomes null); the loader's rules (no nulls, string length, no NUL, date range) then run
  as vectorised Arrow checks, and the bookkeeping columns are computed with numpy/pyarrow.
  A row that fails a check would be re-read with pymongo to record the reject's reason; the
  bench dataset has none, so that path costs nothing here.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.baselines.cursor_drain import first_run_filter, projection
from loader.clients import connect_mongo
from loader.mapping import (
    CODEC_OPTIONS,
    MAX_DATETIME64_MS,
    NON_EMPTY,
    BatchMapper,
    bookkeeping_arrays,
    min_date_ms,
    to_arrow,
)
from loader.schema import fields_of, raw_columns
from loader.settings import Settings
from loader.sync import WATERMARK_INDEX

COLLECTION = "tasks"
RUN_ID = "bench"
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def loader_default() -> str:
    """Which decoder the loader uses today (read from its source, so it cannot go stale)."""
    import loader.sync

    return "pymongoarrow" if "pymongoarrow" in inspect.getsource(loader.sync) else "pymongo"


def _cursor(settings: Settings, raw: bool) -> tuple[Any, Any]:
    client = connect_mongo(settings)
    coll = client.get_database(settings.mongo_db, codec_options=CODEC_OPTIONS)[COLLECTION]
    find = coll.find_raw_batches if raw else coll.find
    cursor = (
        find(first_run_filter(settings), projection(COLLECTION))
        .sort(WATERMARK_INDEX)
        .hint(WATERMARK_INDEX)
        .batch_size(settings.batch_size)
    )
    return client, cursor


def decode_pymongo(settings: Settings, loaded_at_ms: int = 0) -> int:
    client, cursor = _cursor(settings, raw=False)
    mapper = BatchMapper(COLLECTION, settings.max_string_chars)
    rows = pending = 0
    try:
        for doc in cursor:
            mapper.add(doc)
            pending += 1
            if pending >= settings.batch_size:
                rows += to_arrow(mapper.take(), RUN_ID, loaded_at_ms).num_rows
                pending = 0
        rows += to_arrow(mapper.take(), RUN_ID, loaded_at_ms).num_rows
    finally:
        client.close()
    return rows


def _arrow_schema() -> Any:
    from pymongoarrow.api import Schema
    from pymongoarrow.types import ObjectIdType

    fields: dict[str, Any] = {"_id": ObjectIdType()}
    for f in fields_of(COLLECTION):
        if f.kind == "datetime":
            fields[f.name] = pa.timestamp("ms", tz="UTC")
        elif f.kind == "bool":
            fields[f.name] = pa.bool_()
        else:
            fields[f.name] = pa.string()
    return Schema(fields)


def _object_id_columns(ids: pa.Array) -> tuple[pa.Array, pa.Array]:
    """ObjectId bytes → (24-char hex string, creation time in seconds), vectorised."""
    storage = ids.storage if isinstance(ids, pa.ExtensionArray) else ids
    raw = np.frombuffer(storage.buffers()[1], dtype=np.uint8)[
        storage.offset * 12 : (storage.offset + len(storage)) * 12
    ].reshape(-1, 12)
    hexed = np.empty((raw.shape[0], 24), dtype=np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    offsets = np.arange(0, (raw.shape[0] + 1) * 24, 24, dtype=np.int32)
    hex_arr = pa.StringArray.from_buffers(
        raw.shape[0], pa.py_buffer(offsets), pa.py_buffer(hexed.tobytes())
    )
    created = raw[:, :4].copy().view(">u4").reshape(-1).astype(np.int64)
    return hex_arr, pa.array(created, pa.int64()).cast(pa.timestamp("s", tz="UTC"))


def _valid_rows(table: pa.Table, max_chars: int) -> pa.Array:
    """The loader's per-document rules as one boolean mask."""
    ok = pc.is_valid(table["_id"])
    for f in fields_of(COLLECTION):
        col = table[f.name]
        ok = pc.and_(ok, pc.is_valid(col))
        if f.kind == "str":
            ok = pc.and_(ok, pc.less_equal(pc.utf8_length(col), max_chars))
            ok = pc.and_(ok, pc.invert(pc.match_substring(col, "\x00")))
        elif f.kind == "datetime":
            ms = col.cast(pa.int64())
            low = min_date_ms(f.name)
            in_range = pc.and_(pc.greater_equal(ms, low), pc.less_equal(ms, MAX_DATETIME64_MS))
            ok = pc.and_(ok, in_range)
    for name in NON_EMPTY.get(COLLECTION, ()):
        ok = pc.and_(ok, pc.greater(pc.utf8_length(table[name]), 0))
    return ok


def _to_raw(table: pa.Table, loaded_at_ms: int) -> pa.Table:
    hex_ids, created = _object_id_columns(table["_id"].combine_chunks())
    version = table["updated_at"].cast(pa.int64()).cast(pa.uint64())
    known = {"_id": hex_ids, "_id_created_at": created}
    known |= bookkeeping_arrays(version, RUN_ID, loaded_at_ms)
    return pa.table(
        {name: known[name] if name in known else table[name] for name, _ in raw_columns(COLLECTION)}
    )


def decode_pymongoarrow(settings: Settings, loaded_at_ms: int = 0) -> int:
    from pymongoarrow.context import PyMongoArrowContext

    schema = _arrow_schema()
    client, cursor = _cursor(settings, raw=True)
    rows = 0
    try:
        for raw_batch in cursor:
            context = PyMongoArrowContext(schema, CODEC_OPTIONS, allow_invalid=True)
            context.process_bson_stream(raw_batch)
            table = context.finish()
            valid = _valid_rows(table, settings.max_string_chars)
            if pc.all(valid).as_py() is False:
                table = table.filter(valid)  # the others would go to raw.rejects via pymongo
            rows += _to_raw(table, loaded_at_ms).num_rows
    finally:
        client.close()
    return rows
