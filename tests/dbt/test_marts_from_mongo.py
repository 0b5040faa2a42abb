"""Every column of every mart, and the dashboard's numbers, against expectations computed in
Python from a hand-built MongoDB dataset (tests/mongo_oracle.py), never from another model.

The dataset puts files at exact ages from a frozen read time (`AS_OF`, the dbt var `as_of`):
86,399 s, 86,400 s and 86,401 s around the one-day edge, and the other bucket edges likewise;
it holds every status, a tie on `assigned_at`, a deleted current task, a task of an employee the
`employee` collection lacks, one of a deleted employee, and an employee code whose newer
document was deleted while an older one lives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
import yaml
from bson import ObjectId
from mongo_oracle import (
    OPEN_STATUSES,
    backlog_rows,
    employee_dimension,
    file_ageing_rows,
    ms,
    pipeline_state_rows,
    throughput_rows,
    workload_rows,
)
from pymongo import MongoClient
from pymongo.database import Database

REPO = Path(__file__).resolve().parents[2]
AS_OF = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)
DAY = 86_400
_FIRST_ID_SECONDS = int((AS_OF - timedelta(days=120)).timestamp())


def oid(n: int) -> ObjectId:
    """Ids in insertion order, so ties on `assigned_at` have a known winner."""
    return ObjectId(f"{_FIRST_ID_SECONDS + n:08x}" + "0" * 16)


def at(seconds_before: int) -> datetime:
    return AS_OF - timedelta(seconds=seconds_before)


# (code, name, team, active, updated seconds before AS_OF)
EMPLOYEES = [
    ("E1", "Ana Almeida", "intake", True, 100 * DAY),
    ("E2", "Bruno Costa", "review", True, 90 * DAY),
    ("E3", "Carla Dias", "ops", False, 80 * DAY),
    ("E4", "Dora Live", "ops", True, 70 * DAY),
    ("E4", "Dora Deleted", "qa", True, 60 * DAY),  # deleted after the first load
    ("E5", "Eva Gone", "qa", True, 50 * DAY),  # deleted after the first load
]
DELETED_EMPLOYEES = {"Dora Deleted", "Eva Gone"}
# (file, stage, code, name, status, assigned seconds before AS_OF, updated seconds before AS_OF)
TASKS = [
    ("F01", "intake", "E1", "Ana Almeida", "done", 10 * DAY, 9 * DAY),
    ("F01", "review", "E2", "Bruno Costa", "in_progress", DAY - 1, DAY - 1),
    ("F02", "intake", "E1", "Ana Almeida", "assigned", DAY + 1, DAY + 1),
    ("F03", "intake", "E2", "Bruno Costa", "assigned", DAY, DAY),
    ("F04", "processing", "E2", "Bruno Costa", "rejected", 3 * DAY, DAY),
    ("F05", "delivered", "E1", "Ana Almeida", "done", 40 * DAY, 39 * DAY),
    ("F06", "delivered", "E2", "Bruno Costa", "in_progress", 30 * DAY, 30 * DAY),
    ("F07", "approval", "E9", "Zed Ghost", "assigned", 14 * DAY - 1, 14 * DAY - 1),
    ("F08", "quality_check", "E5", "Eva Gone", "in_progress", 30 * DAY - 1, 29 * DAY),
    ("F09", "intake", "E2", "Bruno Costa", "done", 5 * DAY, 4 * DAY),
    ("F09", "review", "E1", "Ana Almeida", "assigned", DAY, DAY),  # deleted after the first load
    ("F10", "review", "E1", "Ana Almeida", "assigned", 2 * DAY, 2 * DAY),  # tie: smaller id
    ("F10", "processing", "E2", "Bruno Costa", "in_progress", 2 * DAY, 2 * DAY),
    ("F11", "intake", "E4", "Dora Live", "assigned", 7 * DAY - 1, 7 * DAY - 1),
    ("F12", "intake", "E4", "Dora Live", "in_progress", 7 * DAY, 7 * DAY),
]
DELETED_TASK = ("F09", "review")
# What mart_file_ageing must say, by hand: (stage, bucket) -> (files, open files, max age s).
AGEING_BY_HAND = {
    ("review", "0-1d"): (1, 1, 86_399),
    ("intake", "1-3d"): (2, 2, 86_401),  # 86,400 s is already a day
    ("processing", "1-3d"): (1, 1, 172_800),
    ("processing", "3-7d"): (1, 0, 259_200),
    ("intake", "3-7d"): (2, 1, 604_799),
    ("intake", "7-14d"): (1, 1, 604_800),
    ("approval", "7-14d"): (1, 1, 1_209_599),
    ("quality_check", "14-30d"): (1, 1, 2_591_999),
    ("delivered", "30d+"): (1, 1, 2_592_000),
}


class Fixture:
    """The dataset loaded and built once for the module, and handles to read it."""

    def __init__(self, db: Database, ch: Any) -> None:
        self.db = db
        self.ch = ch
        self.deleted_employee_docs: list[dict[str, Any]] = []

    def rows(self, sql: str) -> list[dict[str, Any]]:
        result = self.ch.query(sql)
        return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]

    def employees(self) -> dict[str, dict[str, Any]]:
        return employee_dimension(self.db.employee.find({}), self.deleted_employee_docs)

    def state(self) -> dict[str, dict[str, Any]]:
        return pipeline_state_rows(self.db, self.employees(), AS_OF)


def plant(db: Database) -> None:
    db.drop_collection("tasks")
    db.drop_collection("employee")
    db.employee.insert_many(
        {
            "_id": oid(n),
            "employee_code": code,
            "employee_name": name,
            "team": team,
            "active": active,
            "updated_at": at(updated),
        }
        for n, (code, name, team, active, updated) in enumerate(EMPLOYEES)
    )
    db.tasks.insert_many(
        {
            "_id": oid(100 + n),
            "file_id": file_id,
            "stage": stage,
            "employee_code": code,
            "employee_name": name,
            "status": status,
            "assigned_at": at(assigned),
            "updated_at": at(updated),
        }
        for n, (file_id, stage, code, name, status, assigned, updated) in enumerate(TASKS)
    )


@pytest.fixture(scope="module")
def marts(stack: Any, dbt: Any) -> Iterator[Fixture]:
    from loader.reconcile import reconcile_collection
    from loader.settings import Settings
    from loader.sync import sync_collection

    settings = Settings()
    mongo: MongoClient = MongoClient(settings.mongo_uri)
    ch = clickhouse_connect.get_client(host=stack.clickhouse_host, port=stack.clickhouse_port)
    fixture = Fixture(mongo[settings.mongo_db], ch)
    try:
        plant(fixture.db)
        for collection in ("employee", "tasks"):
            sync_collection(settings, collection, full_refresh=True)
        # Deletes after the first load: tombstones keep their last known values.
        gone = list(fixture.db.employee.find({"employee_name": {"$in": list(DELETED_EMPLOYEES)}}))
        fixture.deleted_employee_docs = gone
        fixture.db.employee.delete_many({"_id": {"$in": [d["_id"] for d in gone]}})
        fixture.db.tasks.delete_one({"file_id": DELETED_TASK[0], "stage": DELETED_TASK[1]})
        for collection in ("employee", "tasks"):
            sync_collection(settings, collection)
            assert reconcile_collection(settings, collection).deletes > 0
        dbt.ok("run", "--full-refresh", dbt_vars={"as_of": AS_OF.strftime("%Y-%m-%d %H:%M:%S")})
        yield fixture
    finally:
        ch.close()
        mongo.close()


def normalized(row: dict[str, Any]) -> dict[str, Any]:
    """Comparable values: datetimes as naive UTC ms, booleans as 0/1, floats to the ms."""
    out = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            value = ms(value)
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = round(value, 3)
        out[key] = value
    return out


def by_key(rows: list[dict[str, Any]], *key: str) -> dict[Any, dict[str, Any]]:
    keyed = {tuple(r[k] for k in key) if len(key) > 1 else r[key[0]]: r for r in rows}
    assert len(keyed) == len(rows), f"{key} is not unique"
    return {k: normalized(r) for k, r in keyed.items()}


def test_file_ageing_oracle_puts_the_bucket_edges_where_the_rules_say(marts: Fixture) -> None:
    expected = file_ageing_rows(marts.state(), AS_OF)

    by_hand = {
        k: (r["files"], r["open_files"], r["max_time_in_stage_seconds"])
        for k, r in expected.items()
    }
    assert by_hand == AGEING_BY_HAND


def test_mart_file_ageing_equals_mongodb_in_every_column(marts: Fixture) -> None:
    rows = marts.rows("SELECT * FROM analytics.mart_file_ageing")

    assert by_key(rows, "stage", "age_bucket") == {
        k: normalized(r) for k, r in file_ageing_rows(marts.state(), AS_OF).items()
    }


def test_pipeline_state_equals_mongodb_in_every_column(marts: Fixture) -> None:
    rows = marts.rows("SELECT * FROM analytics.pipeline_state")

    expected = {k: normalized(r) for k, r in marts.state().items()}
    assert by_key(rows, "file_id") == expected
    # The rules at work, spelled out: the tie goes to the larger id, a deleted current task
    # gives way to the one before it, an unknown assignee keeps the task's name.
    assert (expected["F10"]["stage"], expected["F09"]["stage"]) == ("processing", "intake")
    assert (expected["F07"]["employee_name"], expected["F07"]["is_known_employee"]) == (
        "Zed Ghost",
        0,
    )


def test_mart_backlog_by_stage_equals_mongodb_in_every_column(marts: Fixture) -> None:
    rows = marts.rows("SELECT * FROM analytics.mart_backlog_by_stage")

    assert by_key(rows, "stage", "status") == {
        k: normalized(r) for k, r in backlog_rows(marts.state(), AS_OF).items()
    }


def test_mart_employee_workload_equals_mongodb_in_every_column(marts: Fixture) -> None:
    rows = marts.rows("SELECT * FROM analytics.mart_employee_workload")

    expected = {
        k: normalized(r) for k, r in workload_rows(marts.state(), marts.employees(), AS_OF).items()
    }
    assert by_key(rows, "employee_code") == expected
    # Idle, deleted and unknown employees, spelled out.
    spelled = {
        c: (r["open_tasks"], r["is_deleted"], r["is_known_employee"]) for c, r in expected.items()
    }
    assert (spelled["E3"], spelled["E5"], spelled["E9"]) == ((0, 0, 1), (1, 1, 1), (1, 0, 0))


def test_mart_daily_throughput_equals_mongodb_in_every_column(marts: Fixture) -> None:
    rows = marts.rows("SELECT * FROM analytics.mart_daily_throughput")

    assert by_key(rows, "day", "stage") == {
        k: normalized(r) for k, r in throughput_rows(marts.db).items()
    }


def test_mart_employees_keeps_deleted_employees_and_prefers_a_live_document(
    marts: Fixture,
) -> None:
    rows = marts.rows("SELECT * FROM analytics.mart_employees")

    expected = {k: normalized(r) for k, r in marts.employees().items()}
    assert by_key(rows, "employee_code") == expected
    spelled = {c: (r["employee_name"], r["is_deleted"]) for c, r in expected.items()}
    assert (spelled["E4"], spelled["E5"]) == (("Dora Live", 0), ("Eva Gone", 1))


# -- the dashboard (flows/dashboard.py) reads these marts --------------------------------------
def dbt_open_statuses() -> list[str]:
    return yaml.safe_load((REPO / "dbt_project.yml").read_text())["vars"]["open_statuses"]


def test_the_oracles_open_statuses_are_dbts(marts: Fixture) -> None:
    assert sorted(OPEN_STATUSES) == sorted(dbt_open_statuses())


def panels(marts: Fixture, **settings: Any) -> dict[str, list[dict[str, Any]]]:
    """Every panel of the dashboard, read through a fresh cache."""
    import uuid

    from flows import ops
    from flows.dashboard import collect
    from flows.redis_link import RedisLink
    from flows.settings import FlowSettings

    flow_settings = FlowSettings(redis_prefix=f"test-marts-{uuid.uuid4().hex[:8]}", **settings)
    log = logging.getLogger("test")
    link = RedisLink(flow_settings, log)
    ops.ensure_tables(marts.ch)
    try:
        return {p.query.name: p.rows for p in collect(flow_settings, link, marts.ch, log)}
    finally:
        link.close()


def days(seconds: int) -> float:
    return round(seconds / DAY, 1)


def test_dashboard_longest_waiting_lists_the_oldest_open_files_by_dbts_open_statuses(
    marts: Fixture,
) -> None:
    state = marts.state()
    open_files = [r for r in state.values() if r["status"] in dbt_open_statuses()]
    oldest = sorted(open_files, key=lambda r: (-r["time_in_stage_seconds"], r["file_id"]))[:10]

    assert panels(marts)["longest_waiting"] == [
        {
            "file_id": r["file_id"],
            "stage": r["stage"],
            "status": r["status"],
            "employee_name": r["employee_name"],
            "assigned": r["assigned_at"].strftime("%Y-%m-%d %H:%M"),
            "days_in_stage": days(r["time_in_stage_seconds"]),
        }
        for r in oldest
    ]


def test_dashboard_files_per_stage_and_status_show_the_oldest_time_in_stage(
    marts: Fixture,
) -> None:
    backlog = backlog_rows(marts.state(), AS_OF).values()
    ordered = sorted(backlog, key=lambda r: (r["stage_order"], r["status"]))

    assert panels(marts)["files_by_stage_status"] == [
        {
            "stage": r["stage"],
            "status": r["status"],
            "files": r["files"],
            "max_days_in_stage": days(r["max_time_in_stage_seconds"]),
        }
        for r in ordered
    ]


def test_dashboard_workload_shows_open_tasks_and_the_oldest_open_task_per_employee(
    marts: Fixture,
) -> None:
    workload = workload_rows(marts.state(), marts.employees(), AS_OF).values()
    busy = sorted(
        (r for r in workload if r["open_tasks"] > 0),
        key=lambda r: (-r["open_tasks"], r["employee_code"]),
    )

    assert panels(marts)["employee_workload"] == [
        {
            "employee_code": r["employee_code"],
            "employee_name": r["employee_name"],
            "team": r["team"],
            "open_tasks": r["open_tasks"],
            "oldest_open_days": days(r["oldest_open_task_age_seconds"]),
        }
        for r in busy[:15]
    ]


def test_dashboard_query_over_the_threshold_alerts_naming_the_panel(marts: Fixture) -> None:
    from flows.dashboard import PANELS

    marts.ch.command("TRUNCATE TABLE IF EXISTS ops.alerts")

    panels(marts, alert_query_seconds=0)

    raised = marts.rows("SELECT kind, subject, threshold FROM ops.alerts ORDER BY subject")
    assert raised == [
        {"kind": "query_duration", "subject": p.name, "threshold": 0.0}
        for p in sorted(PANELS, key=lambda p: p.name)
    ]
