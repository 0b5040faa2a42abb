"""What a sync reads with a stored watermark, against MongoDB: with a stored `(W, id)` saved by
a run that started reading at R, the next run reads `(updated_at, _id) > (W, id)` when
`W <= R - overlap`, else every `updated_at >= R - overlap`. The bounds themselves are specified
without servers in tests/unit/test_watermark_bounds.py."""

from __future__ import annotations

from datetime import UTC, datetime

from bson import ObjectId
from clickhouse_connect.driver.client import Client
from pymongo.database import Database

from loader.settings import Settings
from loader.sync import sync_collection
from loader.watermark import Watermark, save_watermark

OVERLAP_S = 60


# -- what a sync actually reads with a stored watermark ------------------------------------------
def dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def task(n: int, updated_ms: int) -> dict:
    return {
        "_id": ObjectId(f"65a{n:021x}"),
        "file_id": f"F{n}",
        "stage": "intake",
        "employee_code": "E1",
        "employee_name": "Ana Almeida",
        "status": "assigned",
        "assigned_at": dt(updated_ms),
        "updated_at": dt(updated_ms),
    }


def read_by_a_sync_after(
    settings: Settings,
    plain_db: Database,
    clickhouse_client: Client,
    watermark: Watermark,
    docs: dict[str, dict],
) -> set[str]:
    """Names of the documents a sync reads when `watermark` is stored (the raw table is
    empty, so what it read is what it loaded)."""
    plain_db.tasks.insert_many(docs.values())
    clickhouse_client.command("TRUNCATE TABLE IF EXISTS ops.source_identity")
    save_watermark(clickhouse_client, "tasks", watermark, "planted")
    result = sync_collection(settings, "tasks")
    loaded = {r[0] for r in clickhouse_client.query("SELECT _id FROM raw.tasks").result_rows}
    assert result.docs_read == len(loaded)
    return {name for name, doc in docs.items() if str(doc["_id"]) in loaded}


def test_a_write_stamped_before_r_minus_overlap_is_not_reread(
    settings: Settings, plain_db: Database, clickhouse_client: Client
) -> None:
    r = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
    window = r - OVERLAP_S * 1_000
    docs = {
        "before the window": task(1, window - 1),
        "at R - overlap": task(2, window),
        "inside the window": task(3, window + 500),
        "the watermark's own": task(4, window + 1_000),
    }
    mark = docs["the watermark's own"]
    watermark = Watermark(window + 1_000, str(mark["_id"]), r)  # W inside the window

    read = read_by_a_sync_after(settings, plain_db, clickhouse_client, watermark, docs)

    assert read == {"at R - overlap", "inside the window", "the watermark's own"}


def test_a_quiet_watermark_rereads_nothing_at_or_before_its_key(
    settings: Settings, plain_db: Database, clickhouse_client: Client
) -> None:
    r = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
    w = r - OVERLAP_S * 1_000  # W = R - overlap: past the window, exact bounds
    docs = {
        "earlier": task(1, w - 1),
        "same time, smaller id": task(2, w),
        "the watermark's own": task(3, w),
        "same time, larger id": task(4, w),
        "later": task(5, w + 1),
    }
    watermark = Watermark(w, str(docs["the watermark's own"]["_id"]), r)

    read = read_by_a_sync_after(settings, plain_db, clickhouse_client, watermark, docs)

    assert read == {"same time, larger id", "later"}
