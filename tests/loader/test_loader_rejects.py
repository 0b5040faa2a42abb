"""Documents that cannot be mapped land in `raw.rejects` with a reason; the rest load."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import bson
import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from clickhouse_connect.driver.client import Client
from loader_testlib import Loaded, clickhouse_tasks
from mongo_oracle import AS_STORED, contract_problems, stored_id
from pymongo.database import Database

from loader.clients import Clients
from loader.mapping import dump_document
from loader.settings import Settings
from loader.sync import ensure_watermark_index, sync_collection, undatable_cursors
from loader.watermark import now_ms
from synthetic import REJECTED_KINDS, corrupt, seed

EXPECTED_REASON = {
    "missing_file_id": "file_id: missing",
    "missing_updated_at": "updated_at: missing",
    "string_updated_at": "updated_at: expected a date, got str",
    "string_assigned_at": "assigned_at: expected a date, got str",
    "wrong_type_file_id": "file_id: expected a string, got int",
    "nested_junk": "employee_name: expected a string, got dict",
    "long_string": "employee_name: string of 70005 characters exceeds the limit of 65536",
    "null_status": "status: null",
    "date_out_of_range": "assigned_at: date -5364662400000 ms since epoch is outside",
    "nul_in_string": "file_id: contains a NUL character",
}


def _rejects(client: Client) -> dict[str, tuple[str, str]]:
    rows = client.query("SELECT _id, reason, document FROM raw.rejects").result_rows
    return {r[0]: (r[1], r[2]) for r in rows}


def _replace_with_corrupt(mongo: Database, kind: str) -> bson.ObjectId:
    """Corrupt one stored task in place; returns its id."""
    doc = mongo.tasks.find_one({}, sort=[("_id", 1)])
    mongo.tasks.replace_one({"_id": doc["_id"]}, corrupt(dict(doc), kind))
    return doc["_id"]


@pytest.mark.parametrize("kind", sorted(REJECTED_KINDS))
def test_malformed_document_is_rejected_with_its_reason_and_the_rest_load(
    kind: str,
    settings: Settings,
    clients: Clients,
    plain_db: Database,
    clickhouse_client: Client,
) -> None:
    seed(plain_db, 200, seed=101)
    bad_id = _replace_with_corrupt(plain_db, kind)

    result = sync_collection(settings, "tasks", clients=clients)

    reason, document = _rejects(clickhouse_client)[str(bad_id)]
    assert EXPECTED_REASON[kind] in reason
    assert json.loads(document)["_id"] == {"$oid": str(bad_id)}
    assert (result.rows_written, result.rejects) == (199, 1)
    assert str(bad_id) not in clickhouse_tasks(clickhouse_client)


def test_malformed_mix_rejects_exactly_the_broken_documents(
    settings: Settings, clients: Clients, plain_db: Database, clickhouse_client: Client
) -> None:
    seed(plain_db, 3_000, seed=102, malformed_ratio=0.1)
    # Which documents break the contract, by the documented rules (not the generator's count).
    broken = {
        stored_id(doc["_id"])
        for doc in plain_db.get_collection("tasks", codec_options=AS_STORED).find({})
        if contract_problems(doc, "tasks")
    }

    sync_collection(settings, "tasks", clients=clients)

    assert len(broken) > 100
    assert set(_rejects(clickhouse_client)) == broken
    assert not broken & set(clickhouse_tasks(clickhouse_client))


def test_non_ascii_text_loads_unchanged(
    settings: Settings, clients: Clients, plain_db: Database, clickhouse_client: Client
) -> None:
    seed(plain_db, 100, seed=103)
    doc_id = _replace_with_corrupt(plain_db, "non_ascii")

    sync_collection(settings, "tasks", clients=clients)

    row = clickhouse_tasks(clickhouse_client)[str(doc_id)]
    assert row[3] == "Zoë Ñúñez-王 😀"
    assert row[0].endswith("-Ωmega-文件-ü")


def test_invalid_utf8_is_rejected_without_aborting_the_batch(
    settings: Settings, clients: Clients, plain_db: Database, clickhouse_client: Client
) -> None:
    seed(plain_db, 300, seed=104)
    doc = plain_db.tasks.find_one({}, sort=[("_id", 1)])
    doc["employee_name"] = "ZZZZ"
    raw = bson.encode(doc).replace(b"ZZZZ", b"Z\xff\xfeZ")  # same length: BSON stays valid
    plain_db.tasks.delete_one({"_id": doc["_id"]})
    plain_db.tasks.insert_one(RawBSONDocument(raw))

    result = sync_collection(settings, "tasks", clients=clients)

    assert "employee_name: invalid UTF-8" in _rejects(clickhouse_client)[str(doc["_id"])][0]
    assert (result.rows_written, result.rejects) == (299, 1)


def test_reject_keeps_the_whole_document_not_just_the_loaded_fields(
    settings: Settings, clients: Clients, plain_db: Database, clickhouse_client: Client
) -> None:
    seed(plain_db, 50, seed=105)
    bad_id = _replace_with_corrupt(plain_db, "missing_file_id")
    plain_db.tasks.update_one({"_id": bad_id}, {"$set": {"note": {"extra": [1, 2]}}})

    sync_collection(settings, "tasks", clients=clients)

    document = json.loads(_rejects(clickhouse_client)[str(bad_id)][1])
    assert document["note"] == {"extra": [{"$numberInt": "1"}, {"$numberInt": "2"}]}


def test_document_without_usable_updated_at_is_rejected_once(
    settings: Settings, clients: Clients, plain_db: Database
) -> None:
    seed(plain_db, 100, seed=106)
    _replace_with_corrupt(plain_db, "string_updated_at")

    first = sync_collection(settings, "tasks", clients=clients)
    second = sync_collection(settings, "tasks", clients=clients)

    assert (first.rejects, second.rejects, second.docs_read) == (1, 0, 0)


def test_undated_document_written_after_the_watermark_passed_is_still_rejected(
    loaded: Loaded,
    settings: Settings,
    clients: Clients,
    plain_db: Database,
    clickhouse_client: Client,
) -> None:
    loaded(100, seed=107, into=plain_db)
    late_id = plain_db.tasks.insert_one({"file_id": "late", "updated_at": "yesterday"}).inserted_id

    result = sync_collection(settings, "tasks", clients=clients)

    assert (result.docs_read, result.rejects) == (1, 1)
    assert "updated_at: expected a date, got str" in _rejects(clickhouse_client)[str(late_id)][0]


def test_far_future_document_is_rejected_once_and_does_not_move_the_watermark(
    settings: Settings, clients: Clients, plain_db: Database, clickhouse_client: Client
) -> None:
    seed(plain_db, 100, seed=108)
    future = datetime.now(UTC) + timedelta(days=400)
    doc_id = plain_db.tasks.find_one()["_id"]
    plain_db.tasks.update_one({"_id": doc_id}, {"$set": {"updated_at": future}})

    first = sync_collection(settings, "tasks", clients=clients)
    second = sync_collection(settings, "tasks", clients=clients)

    assert (first.docs_read, first.rejects, second.docs_read) == (100, 1, 0)
    assert "LOADER_MAX_FUTURE_SECONDS" in _rejects(clickhouse_client)[str(doc_id)][0]
    assert first.watermark_after < future.isoformat()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(["x", 1], id="non_dates"),
        pytest.param([], id="empty"),
        pytest.param([datetime(2024, 1, 1, tzinfo=UTC)], id="dates_only"),
    ],
)
def test_array_in_updated_at_is_rejected_once_and_the_rest_load(
    value: list[object], settings: Settings, clients: Clients, plain_db: Database
) -> None:
    seed(plain_db, 100, seed=109)
    doc_id = plain_db.tasks.find_one({}, sort=[("_id", 1)])["_id"]
    plain_db.tasks.update_one({"_id": doc_id}, {"$set": {"updated_at": value}})

    first = sync_collection(settings, "tasks", clients=clients)
    second = sync_collection(settings, "tasks", clients=clients)

    assert (first.rows_written, first.rejects, second.rejects) == (99, 1, 0)


def test_undated_sweep_examines_only_the_keys_of_the_documents_it_finds(
    settings: Settings, plain_db: Database
) -> None:
    seed(plain_db, 2_000, seed=110)
    ensure_watermark_index(plain_db.tasks, settings)
    ids = [d["_id"] for d in plain_db.tasks.find({}, {"_id": 1}).limit(3)]
    plain_db.tasks.update_one({"_id": ids[0]}, {"$unset": {"updated_at": ""}})
    plain_db.tasks.update_one({"_id": ids[1]}, {"$set": {"updated_at": "yesterday"}})
    plain_db.tasks.update_one({"_id": ids[2]}, {"$set": {"updated_at": datetime(2400, 1, 1)}})

    # Raw documents: the plan holds bounds (the lowest BSON date) no `datetime` can hold.
    raw = plain_db.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
    cursors = undatable_cursors(raw.tasks, {"_id": 1}, now_ms())
    stats = [c.explain()["executionStats"] for c in cursors]

    assert [s["nReturned"] for s in stats] == [2, 1]
    assert [s["totalKeysExamined"] for s in stats] == [2, 1]


def test_dump_document_never_raises() -> None:
    class Unserialisable:
        def __repr__(self) -> str:
            return "<thing>"

    text = dump_document({"x": Unserialisable()})

    assert text.startswith("<not serialisable as extended JSON") and "<thing>" in text
