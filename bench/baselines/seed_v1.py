"""The project's first version, rebuilt as the seed describes it, as the "before" baseline.

What the seed says the first sync service did, and what this module therefore does:
- a full scan on every run, no watermark: `list(db.tasks.find(query).sort("assigned_at", 1))`
  loads the whole collection into memory (and sorts it on a field without an index);
- `employees = list(db.employee.find({}, {"_id": 0, "employee_code": 1, ...}))`, copied to
  ClickHouse as is;
- per-row employee lookups: one `find_one` on `employee` for every task (the seed's
  "optimized" version replaces exactly this with an `lru_cache` + Redis lookup);
- row-by-row conversion in Python into lists, inserted in batches of 1000 (the batch size the
  seed later "reduces from 1000 to 500");
- a new ClickHouse connection per operation ("no connection pooling - creates new
  connections each time"): every insert and every DDL statement opens and closes a client.

It writes into its own database (`bench_seed_v1`), a plain MergeTree `task_events` like the
seed's, so it never touches the product's `raw`/`analytics` tables.

One deliberate kindness, so the ratio is not inflated: the bench gives `employee.employee_code`
an index (see `ensure_lookup_index`); without it every per-row lookup is a collection scan.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import clickhouse_connect
from pymongo import MongoClient

from loader.settings import Settings

DATABASE = "bench_seed_v1"
BATCH_SIZE = 1000
TASK_COLUMNS = [
    "task_id",
    "file_id",
    "stage",
    "employee_code",
    "employee_name",
    "team",
    "status",
    "assigned_at",
    "updated_at",
    "synced_at",
]
EMPLOYEE_COLUMNS = ["employee_code", "employee_name", "team", "active"]
DDL = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.task_events (
        task_id String, file_id String, stage String, employee_code String,
        employee_name String, team String, status String,
        assigned_at DateTime64(3, 'UTC'), updated_at DateTime64(3, 'UTC'), synced_at DateTime
    ) ENGINE = MergeTree ORDER BY (file_id, assigned_at)""",
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.employee (
        employee_code String, employee_name String, team String, active UInt8
    ) ENGINE = MergeTree ORDER BY employee_code""",
)


def _client(settings: Settings) -> Any:
    """A brand-new connection, as the first version made for every operation."""
    return clickhouse_connect.get_client(
        host=settings.clickhouse_host,
        port=settings.clickhouse_port,
        username=settings.clickhouse_user,
        password=settings.clickhouse_password.get_secret_value(),
    )


def _command(settings: Settings, sql: str) -> None:
    client = _client(settings)
    try:
        client.command(sql)
    finally:
        client.close()


def _insert(settings: Settings, table: str, rows: list[list[Any]], columns: list[str]) -> None:
    client = _client(settings)
    try:
        client.insert(f"{DATABASE}.{table}", rows, column_names=columns)
    finally:
        client.close()


def ensure_lookup_index(settings: Settings) -> None:
    """Index the per-row lookup's field (bench setup, not timed; see the module docstring)."""
    client: MongoClient = MongoClient(settings.mongo_uri)
    try:
        client[settings.mongo_db].employee.create_index("employee_code")
    finally:
        client.close()


def reset(settings: Settings) -> None:
    """Empty tables before a run: each run is an initial load (not timed)."""
    for sql in DDL:
        _command(settings, sql)
    for table in ("task_events", "employee"):
        _command(settings, f"TRUNCATE TABLE {DATABASE}.{table}")


def _task_row(task: dict[str, Any], employee: dict[str, Any] | None) -> list[Any]:
    employee = employee or {}
    return [
        str(task["_id"]),
        task.get("file_id") or "",
        task.get("stage") or "",
        task.get("employee_code") or "",
        employee.get("employee_name") or task.get("employee_name") or "",
        employee.get("team") or "",
        task.get("status") or "",
        task.get("assigned_at"),
        task.get("updated_at"),
        datetime.now(UTC).replace(tzinfo=None),
    ]


def sync(settings: Settings) -> int:
    """One sync of the first version; returns the number of tasks written."""
    mongo: MongoClient = MongoClient(settings.mongo_uri)
    try:
        db = mongo[settings.mongo_db]
        query: dict[str, Any] = {}  # every task, every time
        assigned_tasks = list(db.tasks.find(query).sort("assigned_at", 1))
        employees = list(
            db.employee.find(
                {}, {"_id": 0, "employee_code": 1, "employee_name": 1, "team": 1, "active": 1}
            )
        )
        _insert(
            settings,
            "employee",
            [
                [
                    e.get("employee_code", ""),
                    e.get("employee_name", ""),
                    e.get("team", ""),
                    int(bool(e.get("active"))),
                ]
                for e in employees
            ],
            EMPLOYEE_COLUMNS,
        )
        written = 0
        batch: list[list[Any]] = []
        for task in assigned_tasks:
            employee = db.employee.find_one(
                {"employee_code": task.get("employee_code")},
                {"_id": 0, "employee_name": 1, "team": 1},
            )
            batch.append(_task_row(task, employee))
            if len(batch) >= BATCH_SIZE:
                _insert(settings, "task_events", batch, TASK_COLUMNS)
                written += len(batch)
                batch = []
        if batch:
            _insert(settings, "task_events", batch, TASK_COLUMNS)
            written += len(batch)
        return written
    finally:
        mongo.close()
