"""Reconcile repairs what the watermark read cannot see: late writes and backward updates."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from clickhouse_connect.driver.client import Client
from loader_testlib import Loaded, clickhouse_tasks, mongo_tasks
from pymongo.collection import Collection
from pymongo.database import Database

from loader import reconcile as reconcile_module
from loader.clients import Clients
from loader.reconcile import ReconcileResult, reconcile_collection
from loader.settings import Settings
from loader.sync import SyncResult, sync_collection


@dataclass(frozen=True)
class Sides:
    """Both sides of the `tasks` collection as every reconcile test uses them."""

    settings: Settings
    clients: Clients
    db: Database  # dates as epoch ms, as the loader reads them
    plain_db: Database  # real datetimes, to write documents back
    clickhouse: Client

    def sync(self) -> SyncResult:
        return sync_collection(self.settings, "tasks", clients=self.clients)

    def reconcile(self, page_size: int = 100_000) -> ReconcileResult:
        return reconcile_collection(
            self.settings, "tasks", clients=self.clients, page_size=page_size
        )

    def assert_in_step(self) -> None:
        """ClickHouse's live tasks are MongoDB's, field for field (pytest shows the difference:
        this module's asserts are rewritten)."""
        assert clickhouse_tasks(self.clickhouse) == mongo_tasks(self.db)

    def rejects(self) -> int:
        return int(
            self.clickhouse.command("SELECT count() FROM raw.rejects WHERE collection = 'tasks'")
        )


@pytest.fixture
def sides(
    settings: Settings,
    clients: Clients,
    db: Database,
    plain_db: Database,
    clickhouse_client: Client,
) -> Sides:
    return Sides(settings, clients, db, plain_db, clickhouse_client)


def _move_updated_at_backwards(
    tasks: Collection, doc: dict[str, Any], days: int, **also: Any
) -> None:
    """An update whose `updated_at` goes back in time: below the watermark, unseen by a sync;
    `also`: other fields it sets."""
    earlier = doc["updated_at"] - timedelta(days=days)
    tasks.update_one({"_id": doc["_id"]}, {"$set": {**also, "updated_at": earlier}})


def _newest(tasks: Collection) -> dict[str, Any]:
    return tasks.find_one({}, sort=[("updated_at", -1)])


def _update_the_newest_backwards(tasks: Collection) -> None:
    _move_updated_at_backwards(tasks, _newest(tasks), 3, status="done")


def _insert_a_copy_of_the_oldest(tasks: Collection) -> None:
    late = tasks.find_one({}, sort=[("updated_at", 1)])
    del late["_id"]
    tasks.insert_one(late)  # dated long before the watermark, like a late commit


@pytest.mark.parametrize(
    ("seed", "write", "repaired_as"),
    [
        pytest.param(
            301, _update_the_newest_backwards, "stale_in_clickhouse", id="update-moving-backwards"
        ),
        pytest.param(
            302,
            _insert_a_copy_of_the_oldest,
            "missing_in_clickhouse",
            id="insert-visible-later-than-the-overlap-window",
        ),
    ],
)
def test_a_write_the_watermark_sync_cannot_see_is_loaded_by_reconcile(
    loaded: Loaded,
    sides: Sides,
    seed: int,
    write: Callable[[Collection], None],
    repaired_as: str,
) -> None:
    loaded(2_000, seed=seed)
    write(sides.plain_db.tasks)
    unseen = sides.sync()

    result = sides.reconcile()

    assert unseen.rows_written == 0  # below the watermark: the sync cannot see it
    assert (getattr(result, repaired_as), result.rows_written) == (1, 1)
    sides.assert_in_step()


def test_a_second_reconcile_after_a_repair_finds_no_difference(
    loaded: Loaded, sides: Sides
) -> None:
    loaded(1_000, seed=303)
    tasks = sides.plain_db.tasks
    _move_updated_at_backwards(tasks, _newest(tasks), 1)
    sides.reconcile()

    again = sides.reconcile()

    assert (again.differing, again.rows_written, again.rejects) == (0, 0, 0)


def test_rejected_documents_are_neither_reloaded_nor_rejected_again(
    loaded: Loaded, sides: Sides
) -> None:
    loaded(1_000, seed=304, malformed_ratio=0.1)
    rejects_after_sync = sides.rejects()

    result = sides.reconcile()

    assert rejects_after_sync > 0
    assert (result.differing, result.rows_written) == (0, 0)
    assert sides.rejects() == rejects_after_sync


def test_reconcile_tombstones_100000_deleted_tasks_in_one_run(loaded: Loaded, sides: Sides) -> None:
    # Far more ids than fit in a URL (ClickHouse takes 128 KiB per parameter, ~4,000 ids):
    # they must travel in request bodies.
    loaded(110_000, seed=305)
    db = sides.db
    cut = db.tasks.find({}, {"_id": 1}).sort("_id", 1).skip(100_000).limit(1).next()["_id"]
    gone = db.tasks.delete_many({"_id": {"$lt": cut}}).deleted_count

    result = sides.reconcile()

    assert gone == 100_000
    assert (result.differing, result.deletes) == (100_000, 100_000)
    sides.assert_in_step()
    assert len(clickhouse_tasks(sides.clickhouse, deleted=True)) == 100_000


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
    sides: Sides,
    tasks: int,
    seed: int,
    gone: int,
    late: int,
    stale: int,
    page_size: int,
) -> None:
    loaded(tasks, seed=seed)
    plain = sides.plain_db.tasks
    by_id = [d["_id"] for d in plain.find({}, {"_id": 1}).sort("_id", 1)]
    plain.delete_many({"_id": {"$in": by_id[:gone]}})
    copied = plain.find({"_id": {"$in": by_id[gone : gone + late]}})
    plain.insert_many([dict(d, _id=ObjectId()) for d in copied])  # dated long ago
    for doc in plain.find({"_id": {"$in": by_id[gone + late : gone + late + stale]}}):
        _move_updated_at_backwards(plain, doc, 2, status="rejected")

    result = sides.reconcile(page_size=page_size)

    counts = (result.deletes, result.missing_in_clickhouse, result.stale_in_clickhouse)
    assert (result.differing, counts) == (gone + late + stale, (gone, late, stale))
    sides.assert_in_step()
    assert sides.reconcile().differing == 0


def test_a_rejected_document_deleted_in_mongo_is_no_longer_counted(
    loaded: Loaded, sides: Sides
) -> None:
    loaded(1_000, seed=307, malformed_ratio=0.1)
    rejected = sides.clickhouse.query(
        "SELECT DISTINCT _id FROM raw.rejects WHERE collection = 'tasks' AND length(_id) = 24"
        " AND _id NOT IN (SELECT _id FROM raw.tasks) LIMIT 3"
    ).result_rows
    ids = [ObjectId(row[0]) for row in rejected]
    sides.db.tasks.delete_many({"_id": {"$in": ids}})

    first = sides.reconcile()
    again = sides.reconcile()

    assert len(ids) == 3
    assert (first.differing, first.rejected_gone, first.deletes) == (3, 3, 0)
    assert again.differing == 0
    assert first.clickhouse_ids - again.clickhouse_ids == 3


def test_reconcile_does_not_tombstone_a_document_written_after_it_read_mongodb(
    loaded: Loaded, sides: Sides, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document inserted (and synced) after reconcile read MongoDB's ids is in ClickHouse
    but not in the ids reconcile read: it looks deleted until reconcile asks MongoDB again."""
    loaded(500, seed=309)
    template = sides.plain_db.tasks.find_one({}, {"_id": 0})
    read_mongo_ids = reconcile_module._mongo_versions
    written: list[ObjectId] = []

    def then_a_concurrent_write(*args: Any) -> Iterator[tuple[str, int]]:
        yield from read_mongo_ids(*args)
        # Right after reconcile has read every id: a new document, loaded by a sync.
        doc = dict(template, updated_at=datetime.now(UTC))
        written.append(sides.plain_db.tasks.insert_one(doc).inserted_id)
        sync_collection(sides.settings, "tasks")

    monkeypatch.setattr(reconcile_module, "_mongo_versions", then_a_concurrent_write)

    result = sides.reconcile()

    assert len(written) == 1
    assert result.differing == 1  # the new document did look deleted
    assert result.deletes == 0
    assert str(written[0]) in clickhouse_tasks(sides.clickhouse)
