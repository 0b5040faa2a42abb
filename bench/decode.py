"""pymongo versus pymongoarrow for the loader's batch conversion (documents → insert-ready Arrow).

Both paths read the loader's initial-load query (same filter, projection, sort, hint and batch
size) and stop where the loader would insert into ClickHouse, so only decoding and conversion
differ. Both call the loader's own code (`LOADER_DECODER` picks one in a real sync):
- `pymongo`: pymongo decodes each document into a dict, `BatchMapper.add` validates and
  appends it column by column, `to_arrow` builds the table.
- `pymongoarrow`: `find_raw_batches` hands raw BSON batches to `loader.columnar`, which decodes
  them straight into Arrow columns and checks the rules vectorised (a batch with a bad document
  would be mapped by `BatchMapper`; the bench dataset has none).
"""

from __future__ import annotations

from typing import Any

from bench.baselines.cursor_drain import first_run_filter, projection
from loader.clients import connect_mongo
from loader.columnar import decode_valid_rows
from loader.mapping import CODEC_OPTIONS, BatchMapper, to_arrow, with_bookkeeping
from loader.settings import Settings
from loader.sync import WATERMARK_INDEX

COLLECTION = "tasks"
RUN_ID = "bench"


def loader_default() -> str:
    """The decoder a sync uses unless `LOADER_DECODER` says otherwise."""
    return str(Settings.model_fields["decoder"].default)


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


def decode_pymongoarrow(settings: Settings, loaded_at_ms: int = 0) -> int:
    client, cursor = _cursor(settings, raw=True)
    rows = 0
    try:
        for raw_batch in cursor:
            columns = decode_valid_rows(raw_batch, COLLECTION, settings.max_string_chars)
            if columns is None:
                raise RuntimeError("the bench dataset holds a document the loader rejects")
            rows += with_bookkeeping(COLLECTION, columns, RUN_ID, loaded_at_ms).num_rows
    finally:
        client.close()
    return rows
