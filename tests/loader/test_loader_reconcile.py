"""Reconcile repairs what the watermark read cannot see: late writes and backward updates."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from clickhouse_connect.driver.client import Client
from loader_testlib import Loaded, clickhouse_tasks, mongo_tasks
from pymongo.database import Database

from loader import reconcile as reconcile_module
from loader.clients import Clients
from loader.reconcile import reconcile_collection
from loader.settings import Settings
from loader.sync import sync_collection


def _rejects(client: Client) -> int:
    return int(client.command("SELECT count() FROM raw.rejects WHERE collection = 'tasks'"))


def test_update_moving_updated_at_backwards_is_loaded_by_reconcile(
    loaded: Loaded,
    settings: Settings,
    clients: Clients,
    db: Database,
    plain_db: Database,
    clickhouse_client: Client,
) -> None:
    loaded(2_000, seed=301)
    doc = plain_db.tasks.find_one({}, sort=[("updated_at", -1)])
    earlier = doc["updated_at"] - timedelta(days=3)
    plain_db.tasks.update_one(
        {"_id": doc["_id"]}, {"$set": {"status": "done", "updated_at": earlier}}
    )
    unseen = sync_collection(settings, "tasks", clients=clients)

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert unseen.rows_written == 0  # below the watermark: the sync cannot see it
    assert (result.stale_in_clickhouse, result.rows_written) == (1, 1)
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_insert_visible_later_than_the_overlap_window_is_loaded_by_reconcile(
    loaded: Loaded,
    settings: Settings,
    clients: Clients,
    db: Database,
    plain_db: Database,
    clickhouse_client: Client,
) -> None:
    loaded(2_000, seed=302)
    late = plain_db.tasks.find_one({}, sort=[("updated_at", 1)])
    del late["_id"]
    plain_db.tasks.insert_one(late)  # dated long before the watermark, like a late commit
    unseen = sync_collection(settings, "tasks", clients=clients)

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert unseen.rows_written == 0
    assert (result.missing_in_clickhouse, result.rows_written) == (1, 1)
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_a_second_reconcile_after_a_repair_finds_no_difference(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, plain_db: Database
) -> None:
    loaded(1_000, seed=303)
    doc = plain_db.tasks.find_one({}, sort=[("updated_at", -1)])
    earlier = doc["updated_at"] - timedelta(days=1)
    plain_db.tasks.update_one({"_id": doc["_id"]}, {"$set": {"updated_at": earlier}})
    reconcile_collection(settings, "tasks", clients=clients)

    again = reconcile_collection(settings, "tasks", clients=clients)

    assert (again.differing, again.rows_written, again.rejects) == (0, 0, 0)


def test_rejected_documents_are_neither_reloaded_nor_rejected_again(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(1_000, seed=304, malformed_ratio=0.1)
    rejects_after_sync = _rejects(clickhouse_client)

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert rejects_after_sync > 0
    assert (result.differing, result.rows_written) == (0, 0)
    assert _rejects(clickhouse_client) == rejects_after_sync


def test_reconcile_tombstones_100000_deleted_tasks_in_one_run(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    # Far more ids than fit in a URL (ClickHouse takes 128 KiB per parameter, ~4,000 ids):
    # they must travel in request bodies.
    loaded(110_000, seed=305)
    cut = db.tasks.find({}, {"_id": 1}).sort("_id", 1).skip(100_000).limit(1).next()["_id"]
    gone = db.tasks.delete_many({"_id": {"$lt": cut}}).deleted_count

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert gone == 100_000
    assert (result.differing, result.deletes) == (100_000, 100_000)
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)
    assert len(clickhouse_tasks(clickhouse_client, deleted=True)) == 100_000


@pytest.mark.parametrize(
    ("tasks", "seed", "gone", "late", "stale", "page_size"),
    [
        pytest.param(3_000, 306, 300, 100, 50, 64, id="pages-of-64"),
        # Every id is the first and the last of its page: page boundaries cannot hide an id.
        pytest.param(500, 308, 3, 2, 4, 1, id="pages-of-one-id"),
    ],
)
def test_reconcile_repairs_every_kind_of_difference_page_by_page(
    loaded: Loaded,
    settings: Settings,
    clients: Clients,
    db: Database,
    plain_db: Database,
    clickhouse_client: Client,
    tasks: int,
    seed: int,
    gone: int,
    late: int,
    stale: int,
    page_size: int,
) -> None:
    loaded(tasks, seed=seed)
    by_id = [d["_id"] for d in plain_db.tasks.find({}, {"_id": 1}).sort("_id", 1)]
    plain_db.tasks.delete_many({"_id": {"$in": by_id[:gone]}})
    copied = plain_db.tasks.find({"_id": {"$in": by_id[gone : gone + late]}})
    plain_db.tasks.insert_many([dict(d, _id=ObjectId()) for d in copied])  # dated long ago
    moved_back = plain_db.tasks.find({"_id": {"$in": by_id[gone + late : gone + late + stale]}})
    for doc in moved_back:  # updated with updated_at moved backwards
        earlier = doc["updated_at"] - timedelta(days=2)
        plain_db.tasks.update_one(
            {"_id": doc["_id"]}, {"$set": {"status": "rejected", "updated_at": earlier}}
        )

    result = reconcile_collection(settings, "tasks", clients=clients, page_size=page_size)

    counts = (result.deletes, result.missing_in_clickhouse, result.stale_in_clickhouse)
    assert (result.differing, counts) == (gone + late + stale, (gone, late, stale))
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)
    assert reconcile_collection(settings, "tasks", clients=clients).differing == 0


def test_a_rejected_document_deleted_in_mongo_is_no_longer_counted(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(1_000, seed=307, malformed_ratio=0.1)
    rejected = clickhouse_client.query(
        "SELECT DISTINCT _id FROM raw.rejects WHERE collection = 'tasks' AND length(_id) = 24"
        " AND _id NOT IN (SELECT _id FROM raw.tasks) LIMIT 3"
    ).result_rows
    ids = [ObjectId(row[0]) for row in rejected]
    db.tasks.delete_many({"_id": {"$in": ids}})

    first = reconcile_collection(settings, "tasks", clients=clients)
    again = reconcile_collection(settings, "tasks", clients=clients)

    assert len(ids) == 3
    assert (first.differing, first.rejected_gone, first.deletes) == (3, 3, 0)
    assert again.differing == 0
    assert first.clickhouse_ids - again.clickhouse_ids == 3


def test_reconcile_does_not_tombstone_a_document_written_after_it_read_mongodb(
    loaded: Loaded,
    settings: Settings,
    clients: Clients,
    db: Database,
    plain_db: Database,
    clickhouse_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A document inserted (and synced) after reconcile read MongoDB's ids is in ClickHouse
    but not in the ids reconcile read: it looks deleted until reconcile asks MongoDB again."""
    loaded(500, seed=309)
    template = plain_db.tasks.find_one({}, {"_id": 0})
    read_mongo_ids = reconcile_module._mongo_versions
    written: list[ObjectId] = []

    def then_a_concurrent_write(*args: Any) -> Iterator[tuple[str, int]]:
        yield from read_mongo_ids(*args)
        # Right after reconcile has read every id: a new document, loaded by a sync.
        doc = dict(template, updated_at=datetime.now(UTC))
        written.append(plain_db.tasks.insert_one(doc).inserted_id)
        sync_collection(settings, "tasks")

    monkeypatch.setattr(reconcile_module, "_mongo_versions", then_a_concurrent_write)

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert len(written) == 1
    assert result.differing == 1  # the new document did look deleted
    assert result.deletes == 0
    assert str(written[0]) in clickhouse_tasks(clickhouse_client)
