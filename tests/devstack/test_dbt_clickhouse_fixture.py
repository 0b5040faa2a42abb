"""Unmodified dbt-clickhouse builds the tiny fixture project against the ClickHouse HTTP front.

The project (tests/fixtures/dbt_tiny) has a seed, an `incremental` model, a `materialized_view`
model over a source table, and schema tests. It is built twice, with new source rows in between,
and both builds (models and tests) must pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_fronts import HOST, Front

PROJECT = Path(__file__).resolve().parents[1] / "fixtures" / "dbt_tiny"
DBT = Path(sys.executable).with_name("dbt")


@pytest.fixture(scope="module")
def port(front: Front) -> int:
    return front.port


@pytest.fixture(scope="module")
def client(port: int) -> Client:
    client = clickhouse_connect.get_client(host=HOST, port=port)
    client.command("CREATE DATABASE IF NOT EXISTS dbt_tiny_raw")
    client.command(
        "CREATE TABLE IF NOT EXISTS dbt_tiny_raw.events "
        "(event_id UInt32, kind_id UInt8, amount Float64) ENGINE = MergeTree ORDER BY event_id"
    )
    return client


def dbt_build(port: int, workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CLICKHOUSE_HOST": HOST,
        "CLICKHOUSE_PORT": str(port),
        "CLICKHOUSE_USER": "default",
        "CLICKHOUSE_PASSWORD": "",
        "DBT_TARGET_PATH": str(workdir / "target"),
        "DBT_LOG_PATH": str(workdir / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_PARTIAL_PARSE": "false",
    }
    return subprocess.run(
        [str(DBT), "build", "--project-dir", str(PROJECT), "--profiles-dir", str(PROJECT)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def insert_events(client: Client, rows: list[list[object]]) -> None:
    client.insert("dbt_tiny_raw.events", rows, column_names=["event_id", "kind_id", "amount"])


def test_project_builds_twice_with_its_tests_passing(
    client: Client, port: int, tmp_path: Path
) -> None:
    insert_events(client, [[1, 1, 1.5], [2, 2, 2.0], [3, 3, 10.0], [4, 1, 0.5]])
    first = dbt_build(port, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:]

    insert_events(client, [[5, 2, 1.0], [6, 3, 5.0]])
    second = dbt_build(port, tmp_path)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "ERROR=0" in second.stdout

    assert client.query(
        "SELECT count(), max(event_id) FROM dbt_tiny.events_enriched"
    ).result_rows == [(6, 6)]
    by_kind = client.query(
        "SELECT kind_id, sum(total_amount), sum(events) FROM dbt_tiny.amount_by_kind "
        "GROUP BY kind_id ORDER BY kind_id"
    ).result_rows
    assert by_kind == [(1, 2.0, 2), (2, 3.0, 2), (3, 15.0, 2)]
