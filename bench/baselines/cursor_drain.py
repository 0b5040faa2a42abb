"""The practical ceiling: iterate the loader's first-run query and do nothing else.

Same filter (the read bounds of an empty watermark), same projection, sort, index hint, batch
size and codec options as `loader.sync`, so the only work left is MongoDB sending the documents
and pymongo decoding them into dicts.
"""

from __future__ import annotations

from loader.clients import connect_mongo
from loader.mapping import CODEC_OPTIONS
from loader.schema import fields_of
from loader.settings import Settings
from loader.sync import WATERMARK_INDEX
from loader.watermark import now_ms, read_bounds


def projection(collection: str) -> dict[str, int]:
    """The loader's projection: `_id` and the mapped fields."""
    return {"_id": 1} | {f.name: 1 for f in fields_of(collection)}


def first_run_filter(settings: Settings) -> dict:
    """The filter of a sync with no watermark yet (an initial load)."""
    bounds = read_bounds(None, settings.overlap_seconds, settings.max_future_seconds, now_ms())
    return bounds.mongo_filter()


def drain(settings: Settings, collection: str = "tasks", batch_size: int | None = None) -> int:
    """Count the documents of an initial load, touching nothing but the cursor."""
    client = connect_mongo(settings)
    try:
        coll = client.get_database(settings.mongo_db, codec_options=CODEC_OPTIONS)[collection]
        cursor = (
            coll.find(first_run_filter(settings), projection(collection))
            .sort(WATERMARK_INDEX)
            .hint(WATERMARK_INDEX)
            .batch_size(batch_size or settings.batch_size)
        )
        n = 0
        for _ in cursor:
            n += 1
        return n
    finally:
        client.close()
