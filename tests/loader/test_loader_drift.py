"""The drift count (`loader.drift`): a difference it reports is one the warehouse really has,
not a write that happened while MongoDB and ClickHouse were being counted."""

from __future__ import annotations

import random
import threading
import time

from loader_testlib import Loaded
from pymongo.database import Database

from loader.clients import Clients
from loader.drift import Drift, measure_drift
from loader.follower import follow_changes
from loader.settings import Settings


def test_deletes_arriving_while_the_counts_run_are_not_taken_for_drift(
    settings: Settings, clients: Clients, db: Database, loaded: Loaded
) -> None:
    """Under a steady deleter, with the follower storing each delete within a fraction of a
    second, MongoDB's count and the warehouse's count are taken moments apart: the deletes in
    between are in flight, not drift (before, each such check read as drift, and the flow
    reconciled the whole collection and raised an alert)."""
    loaded(3_000, seed=301, follow=True)
    ids = [d["_id"] for d in db.tasks.find({}, {"_id": 1})]
    random.Random(3).shuffle(ids)
    stop = threading.Event()
    deleted: list[float] = []

    def deleter() -> None:
        while not stop.is_set() and ids:
            db.tasks.delete_one({"_id": ids.pop()})
            deleted.append(time.monotonic())
            time.sleep(0.01)

    following = threading.Thread(
        target=follow_changes,
        args=(settings, "tasks"),
        kwargs={"stop": stop, "all_changes": True},
    )
    deleting = threading.Thread(target=deleter)
    following.start()
    deleting.start()
    checks: list[tuple[float, float, Drift]] = []
    try:
        time.sleep(0.5)
        for _ in range(8):
            started = time.monotonic()
            drift = measure_drift(clients, "tasks")
            checks.append((started, time.monotonic(), drift))
            time.sleep(0.1)
    finally:
        stop.set()
        deleting.join()
        following.join()

    # The fault happened: documents were deleted while each check ran.
    assert all(any(s <= t <= e for t in deleted) for s, e, _ in checks), "a check saw no delete"
    assert [c.describe() for _, _, c in checks if not c.in_step] == []


def test_a_delete_the_warehouse_has_not_stored_is_drift(
    settings: Settings, clients: Clients, db: Database, loaded: Loaded
) -> None:
    """Without a follower a delete reaches the warehouse only through reconcile: until then
    the counts differ by exactly the documents deleted."""
    loaded(500, seed=302)
    gone = [d["_id"] for d in db.tasks.find({}, {"_id": 1}).limit(7)]
    db.tasks.delete_many({"_id": {"$in": gone}})

    drift = measure_drift(clients, "tasks")

    assert (drift.mongo_count, drift.clickhouse_count, drift.differ) == (493, 500, 7)
