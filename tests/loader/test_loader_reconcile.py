"""Reconcile repairs what the watermark read cannot see: late writes and backward updates."""

from __future__ import annotations

from datetime import timedelta

from clickhouse_connect.driver.client import Client
from loader_testlib import clickhouse_tasks, mongo_tasks
from pymongo.database import Database

from loader.clients import Clients
from loader.reconcile import reconcile_collection, version_hash
from loader.settings import Settings
from loader.sync import sync_collection
from loader.synthetic import seed


def _rejects(client: Client) -> int:
    return int(client.command("SELECT count() FROM raw.rejects WHERE collection = 'tasks'"))


def test_update_moving_updated_at_backwards_is_loaded_by_reconcile(
    settings: Settings,
    clients: Clients,
    db: Database,
    plain_db: Database,
    clickhouse_client: Client,
) -> None:
    seed(db, 2_000, seed=301)
    sync_collection(settings, "tasks", clients=clients)
    doc = plain_db.tasks.find_one({}, sort=[("updated_at", -1)])
    earlier = doc["updated_at"] - timedelta(days=3)
    plain_db.tasks.update_one(
        {"_id": doc["_id"]}, {"$set": {"status": "done", "updated_at": earlier}}
    )
    unseen = sync_collection(settings, "tasks", clients=clients)

    result = reconcile_collection(settings, "tasks", clients=clients, buckets=64)

    assert unseen.rows_written == 0  # below the watermark: the sync cannot see it
    assert (result.stale_in_clickhouse, result.rows_written) == (1, 1)
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_insert_visible_later_than_the_overlap_window_is_loaded_by_reconcile(
    settings: Settings,
    clients: Clients,
    db: Database,
    plain_db: Database,
    clickhouse_client: Client,
) -> None:
    seed(db, 2_000, seed=302)
    sync_collection(settings, "tasks", clients=clients)
    late = plain_db.tasks.find_one({}, sort=[("updated_at", 1)])
    del late["_id"]
    plain_db.tasks.insert_one(late)  # dated long before the watermark, like a late commit
    unseen = sync_collection(settings, "tasks", clients=clients)

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert unseen.rows_written == 0
    assert (result.missing_in_clickhouse, result.rows_written) == (1, 1)
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_a_second_reconcile_after_a_repair_finds_no_difference(
    settings: Settings, clients: Clients, db: Database, plain_db: Database
) -> None:
    seed(db, 1_000, seed=303)
    sync_collection(settings, "tasks", clients=clients)
    doc = plain_db.tasks.find_one({}, sort=[("updated_at", -1)])
    earlier = doc["updated_at"] - timedelta(days=1)
    plain_db.tasks.update_one({"_id": doc["_id"]}, {"$set": {"updated_at": earlier}})
    reconcile_collection(settings, "tasks", clients=clients)

    again = reconcile_collection(settings, "tasks", clients=clients)

    assert (again.mismatched_buckets, again.rows_written, again.rejects) == (0, 0, 0)


def test_rejected_documents_are_neither_reloaded_nor_rejected_again(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 1_000, seed=304, malformed_ratio=0.1)
    sync_collection(settings, "tasks", clients=clients)
    rejects_after_sync = _rejects(clickhouse_client)

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert rejects_after_sync > 0
    assert (result.mismatched_buckets, result.rows_written) == (0, 0)
    assert _rejects(clickhouse_client) == rejects_after_sync


def test_version_hash_matches_clickhouse(clickhouse_client: Client) -> None:
    oid, ms = "6949f9808bb6605dda000000", -1_234

    server = clickhouse_client.command(
        "SELECT reinterpretAsUInt64(substring(MD5(concat({i:String}, ':', "
        "toString({v:Int64}))), 1, 8))",
        parameters={"i": oid, "v": ms},
    )

    assert int(server) == version_hash(oid, ms)
