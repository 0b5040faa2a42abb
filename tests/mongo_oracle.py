"""What the warehouse must show, computed in Python from MongoDB's documents alone.

The rules come from docs/ARCHITECTURE.md, not from the models: the current task of a file is its
non-deleted task with the latest `(assigned_at, _id)`; open statuses are `assigned` and
`in_progress`; throughput counts tasks assigned per day of `assigned_at` and tasks done or
rejected per day of `updated_at`. Tests compare these with the analytics relations.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime
from typing import Any

from clickhouse_connect.driver.client import Client
from pymongo.database import Database

OPEN_STATUSES = ("assigned", "in_progress")


def ms(value: datetime) -> datetime:
    """Naive UTC, millisecond precision: how both MongoDB and ClickHouse values compare."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def current_task_per_file(db: Database) -> dict[str, tuple[Any, ...]]:
    """file_id -> (stage, employee_code, status, assigned_at, task_id) of its current task."""
    best: dict[str, tuple[Any, ...]] = {}
    for doc in db.tasks.find({}):
        row = (doc["stage"], doc["employee_code"], doc["status"], ms(doc["assigned_at"]))
        row += (str(doc["_id"]),)
        current = best.get(doc["file_id"])
        if current is None or (row[3], row[4]) > (current[3], current[4]):
            best[doc["file_id"]] = row
    return best


def warehouse_state(ch: Client) -> dict[str, tuple[Any, ...]]:
    """The same shape, read from `analytics.pipeline_state`."""
    rows = ch.query(
        "SELECT file_id, stage, employee_code, status, assigned_at, task_id "
        "FROM analytics.pipeline_state"
    ).result_rows
    return {r[0]: (r[1], r[2], r[3], ms(r[4]), r[5]) for r in rows}


def backlog(db: Database) -> Counter[tuple[str, str]]:
    """Files per (current stage, current status)."""
    return Counter((s[0], s[2]) for s in current_task_per_file(db).values())


def open_work(db: Database) -> Counter[str]:
    """Files whose current task is open, per assignee."""
    return Counter(s[1] for s in current_task_per_file(db).values() if s[2] in OPEN_STATUSES)


def throughput(db: Database) -> dict[tuple[date, str], tuple[int, int, int]]:
    """(day, stage) -> (tasks assigned, done, rejected)."""
    counts: Counter[tuple[date, str, str]] = Counter()
    for doc in db.tasks.find({}):
        counts[(ms(doc["assigned_at"]).date(), doc["stage"], "assigned")] += 1
        if doc["status"] in ("done", "rejected"):
            counts[(ms(doc["updated_at"]).date(), doc["stage"], doc["status"])] += 1
    days = {(d, s) for d, s, _ in counts}
    return {
        (d, s): (counts[(d, s, "assigned")], counts[(d, s, "done")], counts[(d, s, "rejected")])
        for d, s in days
    }


def live_tasks(db: Database) -> dict[str, tuple[Any, ...]]:
    """task_id -> (file_id, stage, employee_code, status, assigned_at) of every document."""
    return {
        str(d["_id"]): (
            d["file_id"],
            d["stage"],
            d["employee_code"],
            d["status"],
            ms(d["assigned_at"]),
        )
        for d in db.tasks.find({})
    }


def differences_from_mongo(db: Database, ch: Client) -> dict[str, Any]:
    """Every analytics relation compared with its recomputation from MongoDB: an empty dict
    when they all agree, else relation -> (expected, found) of the first that differ."""
    found: dict[str, Any] = {}
    events = {
        r[0]: (r[1], r[2], r[3], r[4], ms(r[5]))
        for r in ch.query(
            "SELECT task_id, file_id, stage, employee_code, status, assigned_at "
            "FROM analytics.task_events WHERE is_deleted = 0"
        ).result_rows
    }
    found["task_events"] = events
    found["pipeline_state"] = warehouse_state(ch)
    found["mart_backlog_by_stage"] = Counter(
        {
            (r[0], r[1]): r[2]
            for r in ch.query(
                "SELECT stage, status, files FROM analytics.mart_backlog_by_stage"
            ).result_rows
        }
    )
    found["mart_employee_workload"] = Counter(
        {
            r[0]: r[1]
            for r in ch.query(
                "SELECT employee_code, open_tasks FROM analytics.mart_employee_workload "
                "WHERE open_tasks > 0"
            ).result_rows
        }
    )
    found["mart_daily_throughput"] = {
        (r[0], r[1]): (r[2], r[3], r[4])
        for r in ch.query(
            "SELECT day, stage, tasks_assigned, tasks_done, tasks_rejected "
            "FROM analytics.mart_daily_throughput"
        ).result_rows
    }
    expected = {
        "task_events": live_tasks(db),
        "pipeline_state": current_task_per_file(db),
        "mart_backlog_by_stage": backlog(db),
        "mart_employee_workload": open_work(db),
        "mart_daily_throughput": throughput(db),
    }
    return {
        name: (expected[name], found[name]) for name in expected if expected[name] != found[name]
    }
