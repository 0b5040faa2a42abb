"""Scenario 8: what only reconcile can repair. A document deleted in MongoDB, one inserted with an
`updated_at` older than the watermark's overlap window (a late commit), and an update that moved
`updated_at` backwards are invisible to the watermark read: the sync alone must leave exactly
those differences, and reconcile must then find exactly them and leave ClickHouse equal to
MongoDB. (The other scenarios assert the converse: after their syncs, reconcile finds only
deletes.)"""

from __future__ import annotations

import time
from datetime import timedelta

from bson import ObjectId
from harness import Report, assert_all_ok, compare_raw
from world import World

DELETED, LATE, BACKWARDS = 7, 5, 4


def plant_what_the_watermark_cannot_see(world: World) -> None:
    by_id = [d["_id"] for d in world.db.tasks.find({}, {"_id": 1}).sort("_id", 1)]
    world.db.tasks.delete_many({"_id": {"$in": by_id[:DELETED]}})
    # Copies of old tasks under new ids: dated long before the watermark, like late commits.
    late = list(world.db.tasks.find({"_id": {"$in": by_id[DELETED : DELETED + LATE]}}))
    world.db.tasks.insert_many([dict(d, _id=ObjectId()) for d in late])
    moved = by_id[DELETED + LATE : DELETED + LATE + BACKWARDS]
    for doc in world.db.tasks.find({"_id": {"$in": moved}}):
        earlier = doc["updated_at"] - timedelta(days=2)
        world.db.tasks.update_one(
            {"_id": doc["_id"]}, {"$set": {"status": "rejected", "updated_at": earlier}}
        )


def test_sync_leaves_exactly_what_only_reconcile_sees_and_reconcile_repairs_it(
    world: World, report: Report
) -> None:
    started = time.monotonic()
    world.seed(3_000)
    world.sync("tasks")
    plant_what_the_watermark_cannot_see(world)

    world.sync("tasks")
    after_sync = compare_raw(world.ch, world.truth(), "tasks")
    repaired = world.reconcile("tasks")
    after_reconcile = compare_raw(world.ch, world.truth(), "tasks")

    planted = DELETED + LATE + BACKWARDS
    report.record(
        "8 only reconcile repairs (deletes, late, backwards)",
        [after_reconcile],
        time.monotonic() - started,
        faults=planted,
    )
    found = (after_sync.not_deleted, after_sync.lost, after_sync.mismatched)
    assert found == (DELETED, LATE, BACKWARDS)
    found = (repaired.deletes, repaired.missing_in_clickhouse, repaired.stale_in_clickhouse)
    assert found == (DELETED, LATE, BACKWARDS)
    assert_all_ok([after_reconcile])
