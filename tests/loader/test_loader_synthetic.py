"""The synthetic source: deterministic, shaped like the real one, mutable in place."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from loader.settings import Settings
from synthetic import (
    STAGES,
    STATUSES,
    NotAnEmbeddedServer,
    activity,
    mutate,
    new_stage_id,
    seed,
)

NOW = datetime(2026, 3, 1, tzinfo=UTC)  # after the seeded data (DEFAULT_END)


def _dump(db: Database) -> list[dict]:
    return list(db.tasks.find().sort("_id", 1)) + list(db.employee.find().sort("_id", 1))


def test_same_seed_gives_identical_collections(
    settings: Settings, mongo_client: MongoClient
) -> None:
    a, b = mongo_client[settings.mongo_db], mongo_client[settings.mongo_db + "_twin"]
    try:
        seed(a, 2_000, seed=7, malformed_ratio=0.05, batch=300)
        seed(b, 2_000, seed=7, malformed_ratio=0.05, batch=1_000)

        assert _dump(a) == _dump(b)
    finally:
        mongo_client.drop_database(b.name)


def test_different_seeds_give_different_data(plain_db: Database) -> None:
    seed(plain_db, 500, seed=1)
    first = _dump(plain_db)
    seed(plain_db, 500, seed=2)

    assert _dump(plain_db) != first


def test_tasks_follow_stages_in_order_per_file(plain_db: Database) -> None:
    result = seed(plain_db, 3_000, seed=8)
    by_file: dict[str, list[dict]] = {}
    for task in plain_db.tasks.find().sort("assigned_at", 1):
        by_file.setdefault(task["file_id"], []).append(task)

    assert plain_db.tasks.count_documents({}) == 3_000 and len(by_file) == result.files
    for tasks in by_file.values():
        assert [t["stage"] for t in tasks] == list(STAGES[: len(tasks)])
        assert all(t["status"] == "done" for t in tasks[:-1])
        assert all(t["assigned_at"] <= t["updated_at"] for t in tasks)
    assert set(Counter(t["status"] for t in plain_db.tasks.find())) <= set(STATUSES)


def test_task_employees_exist_with_their_names(plain_db: Database) -> None:
    seed(plain_db, 1_000, seed=9)
    names = {e["employee_code"]: e["employee_name"] for e in plain_db.employee.find()}

    assert all(names[t["employee_code"]] == t["employee_name"] for t in plain_db.tasks.find())


def test_malformed_ratio_mixes_in_about_that_share(plain_db: Database) -> None:
    result = seed(plain_db, 10_000, seed=10, malformed_ratio=0.1)

    assert 800 <= sum(result.malformed.values()) <= 1_200


def test_mutate_changes_documents_in_place_and_bumps_updated_at(plain_db: Database) -> None:
    seed(plain_db, 2_000, seed=11)

    result = mutate(plain_db, 40, seed=11, now=NOW, new_stages=False)

    assert result == type(result)(updated=40, inserted=0)
    assert plain_db.tasks.count_documents({"updated_at": NOW}) == 40
    assert plain_db.tasks.count_documents({}) == 2_000


def test_mutate_opens_the_next_stage_when_a_task_is_done(plain_db: Database) -> None:
    seed(plain_db, 2_000, seed=12)

    result = mutate(plain_db, 200, seed=12, now=NOW)

    assert result.inserted > 0
    assert (
        plain_db.tasks.count_documents({"assigned_at": NOW, "status": "assigned"})
        == result.inserted
    )


def test_mutate_new_stage_ids_are_unique_and_deterministic(
    settings: Settings, mongo_client: MongoClient
) -> None:
    opened = []
    for name in (settings.mongo_db, settings.mongo_db + "_twin"):
        mongo_client.drop_database(name)
        db = mongo_client[name]
        seed(db, 6_000, seed=14)
        before = {d["_id"] for d in db.tasks.find({}, {"_id": 1})}
        result = mutate(db, 6_000, seed=14, now=NOW)
        ids = sorted(d["_id"] for d in db.tasks.find({}, {"_id": 1}) if d["_id"] not in before)
        assert len(ids) == result.inserted > 0
        opened.append(ids)
    mongo_client.drop_database(settings.mongo_db + "_twin")

    assert opened[0] == opened[1]


def test_new_stage_ids_differ_between_calls_and_within_one() -> None:
    ids = {new_stage_id(s, NOW, n) for s in (1, 2) for n in range(50_000)}
    ids |= {new_stage_id(1, NOW.replace(microsecond=1_000), n) for n in range(50_000)}

    assert len(ids) == 150_000


def test_activity_keeps_changing_the_dataset(plain_db: Database) -> None:
    seed(plain_db, 1_000, seed=13)
    ticks: list[int] = []

    changed = activity(
        plain_db, seed=13, per_tick=5, interval_s=0, ticks=3, on_tick=lambda i, r: ticks.append(i)
    )

    assert ticks == [0, 1, 2] and changed >= 15


def test_seed_drops_only_on_a_server_the_embedded_stack_started(
    plain_db: Database, foreign_server: None
) -> None:
    plain_db.tasks.insert_one({"precious": True})

    with pytest.raises(NotAnEmbeddedServer, match="did not start that server"):
        seed(plain_db, 100, seed=1)
    assert plain_db.tasks.count_documents({}) == 1

    seed(plain_db, 100, seed=1, drop=False)  # adds, drops nothing: allowed
    assert plain_db.tasks.count_documents({}) == 101
    seed(plain_db, 100, seed=1, force=True)
    assert plain_db.tasks.count_documents({}) == 100
