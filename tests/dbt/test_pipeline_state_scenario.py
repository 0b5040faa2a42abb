"""pipeline_state equals the naive recomputation after every kind of change.

Each step changes the MongoDB source the way the application could, loads it with the loader
(deletes through its reconciliation pass), runs the incremental `task_events` model (whose hooks
keep the materialized state), and compares `analytics.pipeline_state` with the naive `argMax`
computed here in Python from MongoDB itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo.database import Database

State = dict[str, tuple[str, str, str, datetime, str]]


def _utc(value: datetime) -> datetime:
    """Naive UTC, millisecond precision: how both MongoDB and ClickHouse values compare."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _now() -> datetime:
    return _utc(datetime.now(UTC))


def naive_state(db: Database) -> State:
    """argMax((stage, employee_code, status, assigned_at, _id), (assigned_at, _id)) per file
    over the documents that exist in MongoDB now."""
    best: dict[str, tuple[tuple[datetime, str], tuple[str, str, str, datetime, str]]] = {}
    for doc in db.tasks.find({}):
        task_id = str(doc["_id"])
        assigned_at = _utc(doc["assigned_at"])
        key = (assigned_at, task_id)
        current = best.get(doc["file_id"])
        if current is None or key > current[0]:
            row = (doc["stage"], doc["employee_code"], doc["status"], assigned_at, task_id)
            best[doc["file_id"]] = (key, row)
    return {file_id: row for file_id, (_, row) in best.items()}


def pipeline_state(warehouse: Any) -> State:
    rows = warehouse.rows(
        "select file_id, stage, employee_code, status, assigned_at, task_id"
        " from analytics.pipeline_state"
    )
    return {r[0]: (r[1], r[2], r[3], _utc(r[4]), r[5]) for r in rows}


def _tasks_of(db: Database, file_id: str) -> list[dict[str, Any]]:
    return sorted(db.tasks.find({"file_id": file_id}), key=lambda d: (d["assigned_at"], d["_id"]))


def _files_with_tasks(db: Database, at_least: int) -> list[str]:
    pipeline = [
        {"$group": {"_id": "$file_id", "n": {"$sum": 1}}},
        {"$match": {"n": {"$gte": at_least}}},
        {"$sort": {"_id": 1}},
    ]
    return [d["_id"] for d in db.tasks.aggregate(pipeline)]


def _employees(db: Database) -> list[dict[str, Any]]:
    return list(db.employee.find({}, {"employee_code": 1, "employee_name": 1}).sort("_id"))


def inserts_status_changes_and_reassignments(db: Database) -> None:
    from synthetic import mutate

    result = mutate(db, 40, seed=11)
    assert result.updated > 0 and result.inserted > 0


def reassignments_forward_in_time(db: Database) -> None:
    employees = _employees(db)
    now = _now()
    for i, file_id in enumerate(_files_with_tasks(db, 1)[:6]):
        current = _tasks_of(db, file_id)[-1]
        emp = next(
            e for e in employees[i:] + employees if e["employee_code"] != current["employee_code"]
        )
        db.tasks.update_one(
            {"_id": current["_id"]},
            {
                "$set": {
                    "employee_code": emp["employee_code"],
                    "employee_name": emp["employee_name"],
                    "assigned_at": now,
                    "updated_at": now,
                }
            },
        )


def ties_on_assigned_at(db: Database) -> None:
    """Two new tasks with the same assigned_at (the larger _id wins), and an existing older
    task moved onto the current task's assigned_at (again the larger _id wins)."""
    now = _now()
    employees = _employees(db)
    files = _files_with_tasks(db, 2)
    for file_id in files[6:9]:
        tie_at = now + timedelta(minutes=5)
        for n, stage in enumerate(("approval", "delivered")):
            emp = employees[n % len(employees)]
            db.tasks.insert_one(
                {
                    "_id": ObjectId(),
                    "file_id": file_id,
                    "stage": stage,
                    "employee_code": emp["employee_code"],
                    "employee_name": emp["employee_name"],
                    "status": "assigned",
                    "assigned_at": tie_at,
                    "updated_at": now,
                }
            )
    for file_id in files[9:12]:
        tasks = _tasks_of(db, file_id)
        db.tasks.update_one(
            {"_id": tasks[0]["_id"]},
            {"$set": {"assigned_at": tasks[-1]["assigned_at"], "updated_at": now}},
        )


def assigned_at_moved_backwards(db: Database) -> None:
    """The current task's assigned_at moves before its siblings: another task becomes current,
    which an insert-only view cannot see."""
    now = _now()
    for file_id in _files_with_tasks(db, 2)[12:16]:
        tasks = _tasks_of(db, file_id)
        earlier = tasks[0]["assigned_at"] - timedelta(days=3)
        db.tasks.update_one(
            {"_id": tasks[-1]["_id"]}, {"$set": {"assigned_at": earlier, "updated_at": now}}
        )


def deletes(db: Database) -> None:
    """Delete the current task of some files (an older one becomes current) and every task of
    one file (the file leaves pipeline_state)."""
    files = _files_with_tasks(db, 2)
    for file_id in files[16:20]:
        db.tasks.delete_one({"_id": _tasks_of(db, file_id)[-1]["_id"]})
    gone = files[20]
    db.tasks.delete_many({"file_id": gone})


def task_moved_to_another_file(db: Database) -> None:
    now = _now()
    files = _files_with_tasks(db, 2)
    for source, target in ((files[21], files[22]), (files[23], files[24])):
        current = _tasks_of(db, source)[-1]
        db.tasks.update_one(
            {"_id": current["_id"]}, {"$set": {"file_id": target, "updated_at": now}}
        )


@dataclass(frozen=True)
class Step:
    name: str
    change: Callable[[Database], None]
    deletes: bool = False


STEPS = (
    Step(
        "inserts, status changes and reassignments (synthetic mutate)",
        inserts_status_changes_and_reassignments,
    ),
    Step("reassignments forward in time", reassignments_forward_in_time),
    Step("ties on assigned_at", ties_on_assigned_at),
    Step("assigned_at moved backwards", assigned_at_moved_backwards),
    Step("deletes", deletes, deletes=True),
    Step("task moved to another file", task_moved_to_another_file),
)


def test_pipeline_state_equals_naive_recomputation_after_each_kind_of_change(built, dbt) -> None:
    db = built.db
    assert pipeline_state(built) == naive_state(db), "after the initial full build"
    for step in STEPS:
        before = naive_state(db)
        step.change(db)
        expected = naive_state(db)
        assert expected != before, f"step {step.name!r} changed nothing; the scenario is broken"

        built.load(deletes=step.deletes)
        dbt.ok("run", "--select", "task_events+")

        actual = pipeline_state(built)
        wrong = {f for f in expected.keys() | actual.keys() if expected.get(f) != actual.get(f)}
        assert not wrong, f"after {step.name!r}: {len(wrong)} file(s) differ, e.g. " + "; ".join(
            f"{f}: expected {expected.get(f)}, got {actual.get(f)}" for f in sorted(wrong)[:3]
        )

    # The same through dbt's own singular test, which compares with the recomputation over raw.
    dbt.ok("test", "--select", "assert_pipeline_state_matches_naive_recomputation")
