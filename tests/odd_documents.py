"""Odd documents: well-typed tasks outside the known vocabulary or referencing an unknown
employee, planted beside valid data (tests/dbt and tests/flows)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bson import ObjectId
from mongo_oracle import ms
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
