"""The flow's ClickHouse bookkeeping in the `ops` database.

Tables owned here (created if missing): `ops.step_timings`, `ops.alerts`. `ops.sync_runs` and
`ops.build_pending` belong to the loader (`loader.schema`); the flow adds "skipped" run rows and
clears build marks (`loader.build_pending`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from flows.settings import FlowSettings
from loader.clients import connect_clickhouse, insert_json_rows
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


def last_runs_sql(limit: int) -> str:
    """The run history, newest first: one row per flow run of `ops.step_timings`, with the one
    outcome rule every view shows (the web page, `make dashboard`): `failed` when a step failed,
    `skipped` when the guard found another run holding the lock, `no changes` when nothing was
    built, else `ok`. Times are Unix milliseconds (views format them)."""
    return f"""
    SELECT run_id,
           toUnixTimestamp64Milli(min(started_at)) AS started_ms,
           toUnixTimestamp64Milli(max(ended_at)) AS ended_ms,
           multiIf(countIf(kind = 'step' AND status = 'failed') > 0, 'failed',
                   countIf(step = 'guard' AND status = 'skipped') > 0, 'skipped',
                   countIf(step = 'dbt_build' AND status = 'ok') = 0, 'no changes',
                   'ok') AS outcome,
           sumIf(rows, startsWith(step, 'load:')) AS rows_loaded,
           round(sumIf(duration_s, startsWith(step, 'load:')), 2) AS load_s,
           round(sumIf(duration_s, step = 'dbt_build'), 2) AS dbt_s,
           countIf(kind = 'dbt_node') AS dbt_nodes,
           substring(anyIf(message, kind = 'step' AND status IN ('failed', 'skipped')), 1, 240)
               AS note
    FROM ops.step_timings
    GROUP BY run_id
    ORDER BY min(started_at) DESC
    LIMIT {int(limit)}
    """


def now() -> datetime:
    return datetime.now(UTC)


def connect(settings: FlowSettings) -> Client:
    """The flow's ClickHouse client: the loader's factory, so a run's clients share one
    configuration (no session, the same timeouts and connect deadline)."""
    return connect_clickhouse(settings)


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
