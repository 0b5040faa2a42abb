"""Odd documents: well-typed tasks outside the known vocabulary or referencing an unknown
employee, planted beside valid data (tests/dbt and tests/flows)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from mongo_oracle import current_task_per_file, ms
from pymongo.database import Database

STAGES = ["intake", "review", "processing", "quality_check", "approval", "delivered"]
STATUSES = ["assigned", "in_progress", "done", "rejected"]
ODD = {"stage": "archived", "status": "lost", "employee_code": "E-NOBODY"}


def plant_odd_tasks(db: Database) -> dict[str, ObjectId]:
    """One new task per odd field, each the latest task of an existing file (so it is that
    file's current task), otherwise like the task it follows; returns field -> task id."""
    at = ms(datetime.now(UTC) + timedelta(seconds=1))
    files = sorted(db.tasks.distinct("file_id"))[:3]
    planted = {}
    for file_id, (field, value) in zip(files, ODD.items(), strict=True):
        latest = db.tasks.find_one({"file_id": file_id}, sort=[("assigned_at", -1), ("_id", -1)])
        assert latest is not None
        doc = {k: v for k, v in latest.items() if k != "_id"}
        doc.update({field: value, "assigned_at": at, "updated_at": at})
        planted[field] = db.tasks.insert_one(doc).inserted_id
    return planted


STATE_SQL = (
    "SELECT file_id, stage, employee_code, status, assigned_at, task_id, stage_order,"
    " is_known_stage, is_known_status, is_known_employee FROM analytics.pipeline_state"
)


def flagged_tasks(state: list[dict[str, Any]], db: Database) -> dict[str, dict[str, Any]]:
    """Check `pipeline_state` rows (`STATE_SQL`) against MongoDB: each file's current task, and
    every flag set by the rules (known stage and its position, known status, known employee).
    Returns the rows with a flag at 0, by task id."""
    current = {
        r["file_id"]: (r["stage"], r["employee_code"], r["status"], ms(r["assigned_at"]))
        + (r["task_id"],)
        for r in state
    }
    assert current == current_task_per_file(db)
    codes = set(db.employee.distinct("employee_code"))
    for r in state:
        assert r["is_known_stage"] == (r["stage"] in STAGES)
        assert r["stage_order"] == (STAGES.index(r["stage"]) + 1 if r["stage"] in STAGES else 0)
        assert r["is_known_status"] == (r["status"] in STATUSES)
        assert r["is_known_employee"] == (r["employee_code"] in codes)
    flags = ("is_known_stage", "is_known_status", "is_known_employee")
    return {r["task_id"]: r for r in state if 0 in (r[f] for f in flags)}
