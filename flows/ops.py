"""The flow's ClickHouse bookkeeping in the `ops` database.

Tables owned here (created if missing): `ops.step_timings`, `ops.alerts`. `ops.sync_runs` and
`ops.build_pending` belong to the loader (`loader.schema`); the flow adds "skipped" run rows and
clears build marks (`loader.build_pending`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from flows.settings import FlowSettings
from loader.clients import insert_json_rows
from loader.cluster import configured_cluster
from loader.schema import Table, create_statements, on_cluster

STEP_TIMINGS = Table(
    "ops",
    "step_timings",
    (
        ("run_id", "String"),
        ("step", "String"),
        ("kind", "LowCardinality(String)"),
        ("status", "LowCardinality(String)"),
        ("started_at", "DateTime64(3, 'UTC')"),
        ("ended_at", "DateTime64(3, 'UTC')"),
        ("duration_s", "Float64"),
        ("rows", "UInt64"),
        ("message", "String"),
    ),
    "MergeTree",
    "(started_at, run_id, step)",
    shard_key="cityHash64(run_id)",
)
ALERTS = Table(
    "ops",
    "alerts",
    (
        ("raised_at", "DateTime64(3, 'UTC')"),
        ("run_id", "String"),
        ("kind", "LowCardinality(String)"),
        ("subject", "String"),
        ("value", "Float64"),
        ("threshold", "Float64"),
        ("message", "String"),
    ),
    "MergeTree",
    "(raised_at, kind)",
    shard_key="cityHash64(run_id)",
)


def ddl(cluster: str = "") -> list[str]:
    """The statements creating the flow's tables (`ON CLUSTER`, replicated, on a cluster)."""
    statements = [f"CREATE DATABASE IF NOT EXISTS ops{on_cluster(cluster)}"]
    for table in (STEP_TIMINGS, ALERTS):
        statements += create_statements(table, cluster)
    return statements


STEP_COLUMNS = (
    "run_id",
    "step",
    "kind",
    "status",
    "started_at",
    "ended_at",
    "duration_s",
    "rows",
    "message",
)
ALERT_COLUMNS = ("raised_at", "run_id", "kind", "subject", "value", "threshold", "message")
SYNC_RUN_COLUMNS = (
    "run_id",
    "collection",
    "status",
    "started_at",
    "ended_at",
    "duration_s",
    "docs_read",
    "rows_written",
    "rejects",
    "deletes",
    "watermark_before",
    "watermark_after",
    "peak_rss_bytes",
    "message",
)


def now() -> datetime:
    return datetime.now(UTC)


def connect(settings: FlowSettings) -> Client:
    return clickhouse_connect.get_client(
        host=settings.clickhouse_host,
        port=settings.clickhouse_port,
        username=settings.clickhouse_user,
        password=settings.clickhouse_password,
    )


def ensure_tables(client: Client, cluster: str | None = None) -> None:
    """`cluster`: `CLICKHOUSE_CLUSTER` (None: read from the environment, see loader.schema)."""
    for statement in ddl(configured_cluster() if cluster is None else cluster):
        client.command(statement)


def insert_rows(
    client: Client, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    data = [list(r) for r in rows]
    if not data:
        return
    try:
        insert_json_rows(client, table, columns, data)  # no pandas import (loader.clients)
    except ValueError:  # a value JSON cannot carry (nan, inf)
        client.insert(table, data, column_names=list(columns))


def record_skipped_run(
    client: Client,
    run_id: str,
    collections: Iterable[str],
    started_at: datetime,
    message: str,
) -> None:
    """One `skipped` row per collection in the loader's `ops.sync_runs`."""
    ended = now()
    duration = (ended - started_at).total_seconds()
    rows = [
        (run_id, c, "skipped", started_at, ended, duration, 0, 0, 0, 0, "", "", 0, message)
        for c in collections
    ]
    insert_rows(client, "ops.sync_runs", SYNC_RUN_COLUMNS, rows)
