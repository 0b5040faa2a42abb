"""The embedded MongoDB is a real mongod 6.0 running as a replica set with change streams."""

from __future__ import annotations

import threading
import time

from pymongo import MongoClient


def test_mongod_reports_version_6_0(mongo_client: MongoClient) -> None:
    version = mongo_client.admin.command("buildInfo")["version"]
    assert version.startswith("6.0."), version


def test_replica_set_rs0_has_a_primary(mongo_client: MongoClient) -> None:
    status = mongo_client.admin.command("replSetGetStatus")
    assert status["set"] == "rs0"
    assert [m["stateStr"] for m in status["members"]] == ["PRIMARY"]


def test_change_stream_sees_insert_and_update_from_another_client(
    mongo_client: MongoClient, stack
) -> None:
    collection = mongo_client["devstack_test"]["change_stream"]
    collection.drop()
    with collection.watch(full_document="updateLookup", max_await_time_ms=500) as stream:
        # Another client (its own connection pool) makes the changes while we watch.
        def write() -> None:
            with MongoClient(stack.mongo_uri) as other:
                other_collection = other["devstack_test"]["change_stream"]
                other_collection.insert_one({"_id": "f1", "stage": "intake"})
                other_collection.update_one({"_id": "f1"}, {"$set": {"stage": "review"}})

        writer = threading.Thread(target=write)
        writer.start()
        events = []
        deadline = time.monotonic() + 30  # a bound, so a broken stream fails instead of hanging
        while len(events) < 2 and time.monotonic() < deadline:
            change = stream.try_next()
            if change is not None:
                events.append(change)
            elif not stream.alive:
                break
        writer.join()

    assert [e["operationType"] for e in events] == ["insert", "update"]
    assert events[0]["fullDocument"] == {"_id": "f1", "stage": "intake"}
    assert events[1]["updateDescription"]["updatedFields"] == {"stage": "review"}
