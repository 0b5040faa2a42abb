"""Raw BSON batch → `raw.<collection>` rows as Arrow, without building a dict per document.

pymongoarrow decodes a server batch straight into typed Arrow columns (a value of another BSON
type becomes null), and the rules of `loader.mapping` then run as vectorised checks. This path
only ever *accepts* a batch: when any row breaks a rule (invalid UTF-8 included), it returns
None and the caller maps that batch document by document with
`BatchMapper`, which decides the rejects and their reasons. So both paths load the same rows;
this one is faster (see `make bench`, section decode).
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loader.mapping import CODEC_OPTIONS, MAX_DATETIME64_MS, NON_EMPTY, min_date_ms
from loader.schema import ID_COLUMNS, fields_of

with warnings.catch_warnings():
    # The wheel is built against pyarrow's headers of its own minor release; Cython reports
    # the grown object sizes of a later patch release, which is harmless for what we call.
    warnings.filterwarnings("ignore", message=r".*size changed, may indicate binary incompat")
    from pymongoarrow.api import Schema
    from pymongoarrow.context import PyMongoArrowContext
    from pymongoarrow.types import ObjectIdType

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_OBJECT_ID_BYTES = 12


@cache
def _schema(collection: str) -> Schema:
    types: dict[str, Any] = {"_id": ObjectIdType()}
    for f in fields_of(collection):
        if f.kind == "datetime":
            types[f.name] = pa.timestamp("ms", tz="UTC")
        elif f.kind == "bool":
            types[f.name] = pa.bool_()
        else:
            types[f.name] = pa.string()
    return Schema(types)


def object_id_columns(ids: pa.Array) -> tuple[pa.Array, pa.Array]:
    """ObjectIds → (24-character hex, creation time in seconds), as `ID_COLUMNS` stores them."""
    storage = ids.storage if isinstance(ids, pa.ExtensionArray) else ids
    start = storage.offset * _OBJECT_ID_BYTES
    raw = np.frombuffer(storage.buffers()[1], dtype=np.uint8)[
        start : start + len(storage) * _OBJECT_ID_BYTES
    ].reshape(-1, _OBJECT_ID_BYTES)
    hexed = np.empty((len(raw), 2 * _OBJECT_ID_BYTES), dtype=np.uint8)
    hexed[:, 0::2] = _HEX_DIGITS[raw >> 4]
    hexed[:, 1::2] = _HEX_DIGITS[raw & 0x0F]
    offsets = np.arange(0, (len(raw) + 1) * 24, 24, dtype=np.int32)
    hex_ids = pa.StringArray.from_buffers(len(raw), pa.py_buffer(offsets), pa.py_buffer(hexed))
    seconds = raw[:, :4].copy().view(">u4").reshape(-1).astype(np.int64)
    return hex_ids, pa.array(seconds, pa.int64()).cast(pa.timestamp("s", tz="UTC"))


def _utf8_valid(table: pa.Table, collection: str) -> bool:
    """pymongoarrow copies string bytes as they are; Arrow's full validation checks UTF-8
    (surrogates and overlong forms included, as Python's codec does)."""
    for f in fields_of(collection):
        if f.kind == "str":
            try:
                table[f.name].validate(full=True)
            except pa.ArrowInvalid:
                return False
    return True


def _every_row_valid(table: pa.Table, collection: str, max_string_chars: int) -> bool:
    """`BatchMapper`'s rules over whole columns (a null is a missing or mistyped value)."""
    checks: list[pa.Array] = [pc.is_valid(table["_id"])]
    non_empty = NON_EMPTY.get(collection, frozenset())
    for f in fields_of(collection):
        col = table[f.name]
        checks.append(pc.is_valid(col))
        if f.kind == "str":
            chars = pc.utf8_length(col)
            checks.append(pc.less_equal(chars, max_string_chars))
            checks.append(pc.invert(pc.match_substring(col, "\x00")))
            if f.name in non_empty:
                checks.append(pc.greater(chars, 0))
        elif f.kind == "datetime":
            ms = col.cast(pa.int64())
            checks.append(pc.greater_equal(ms, min_date_ms(f.name)))
            checks.append(pc.less_equal(ms, MAX_DATETIME64_MS))
    # A check on a null value is null: count it as failed, never skip it.
    return all(pc.all(check.fill_null(False)).as_py() for check in checks)


def decode_valid_rows(
    raw: bytes, collection: str, max_string_chars: int
) -> dict[str, pa.Array | pa.ChunkedArray] | None:
    """The documents of `raw` (concatenated BSON) as `ID_COLUMNS` + field columns, in the raw
    table's types (ready for `mapping.with_bookkeeping`); None when any document breaks a rule."""
    context = PyMongoArrowContext(_schema(collection), CODEC_OPTIONS, allow_invalid=True)
    context.process_bson_stream(raw)
    table = context.finish()
    if not _utf8_valid(table, collection) or not _every_row_valid(
        table, collection, max_string_chars
    ):
        return None
    hex_ids, created = object_id_columns(table["_id"].combine_chunks())
    columns: dict[str, Any] = dict(zip((n for n, _ in ID_COLUMNS), (hex_ids, created), strict=True))
    for f in fields_of(collection):
        col = table[f.name]
        columns[f.name] = col.cast(pa.uint8()) if f.kind == "bool" else col
    return columns
