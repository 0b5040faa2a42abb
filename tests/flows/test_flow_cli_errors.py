"""Errors a person can act on, from `python -m flows.pipeline|serve|dashboard` on real servers.

Each prints one `error:` line on stderr naming the variable to fix and exits 2, with no
traceback (Prefect's own log lines about the failed run stay, without theirs) unless --verbose.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devstack.process import free_ports
from devstack.stack import Stack


def _run(module: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()  # the session's test harness, when a test asked for it
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=os.environ | ({"PREFECT_API_URL": api} if api else {}) | env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _error_line(out: subprocess.CompletedProcess[str], *names: str) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1, out.stderr[-3000:]
    # Prefect's own report of the failed run (the exception's repr) would say it twice.
    assert "| ERROR" not in out.stderr, out.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    return free_ports(1)[0]


# --- flows.pipeline -------------------------------------------------------------------------


def test_pipeline_with_unreachable_mongo_records_the_failed_syncs(
    pipeline: Any, closed_port: int
) -> None:
    out = _run("flows.pipeline", MONGO_URI=f"mongodb://127.0.0.1:{closed_port}/?replicaSet=rs0")

    line = _error_line(out, "MONGO_URI", f"127.0.0.1:{closed_port}")
    assert re.search(r"did not answer within 5\.\d s", line), line  # LOADER_CONNECT_DEADLINE
    assert "did not move" in line
    runs = pipeline.rows(
        "SELECT collection, run_id, message FROM ops.sync_runs WHERE status = 'failed'"
    )
    assert sorted(r["collection"] for r in runs) == ["employee", "tasks"]
    assert len({r["run_id"] for r in runs}) == 1  # the flow run's id
    assert all("MONGO_URI" in r["message"] and "did not move" in r["message"] for r in runs)


def test_pipeline_with_a_refused_clickhouse_password(
    pipeline: Any, secured_clickhouse: Stack
) -> None:
    out = _run(
        "flows.pipeline",
        CLICKHOUSE_PORT=str(secured_clickhouse.clickhouse_port),
        CLICKHOUSE_PASSWORD="wrong",
    )

    _error_line(out, "CLICKHOUSE_USER / CLICKHOUSE_PASSWORD", "AUTHENTICATION_FAILED")


def test_pipeline_with_a_bad_setting_fails_before_a_flow_run(pipeline: Any) -> None:
    out = _run("flows.pipeline", PIPELINE_TASK_RETRIES="several")

    _error_line(out, "invalid setting PIPELINE_TASK_RETRIES")
    assert "Flow run" not in out.stderr


def test_pipeline_when_dbt_cannot_load_its_profile(pipeline: Any, tmp_path: Path) -> None:
    out = _run("flows.pipeline", PIPELINE_DBT_PROFILES_DIR=str(tmp_path / "nowhere"))

    _error_line(out, "dbt", "PIPELINE_DBT_PROFILES_DIR", "profiles.yml")
    # The loads themselves succeeded: no failed sync is recorded for them.
    assert pipeline.scalar("SELECT countIf(status = 'failed') FROM ops.sync_runs") == 0
    assert pipeline.scalar("SELECT countIf(status = 'ok') FROM ops.sync_runs") == 2


# --- flows.dashboard and flows.serve ----------------------------------------------------------


@pytest.mark.parametrize("module", ["flows.dashboard", "flows.serve"])
def test_refused_clickhouse_password(stack: Stack, secured_clickhouse: Stack, module: str) -> None:
    args = ["--no-server"] if module == "flows.serve" else []

    out = _run(
        module,
        *args,
        CLICKHOUSE_PORT=str(secured_clickhouse.clickhouse_port),
        CLICKHOUSE_PASSWORD="wrong",
    )

    _error_line(out, "CLICKHOUSE_USER / CLICKHOUSE_PASSWORD")


@pytest.mark.parametrize("module", ["flows.dashboard", "flows.serve"])
def test_unreachable_clickhouse(stack: Stack, module: str, closed_port: int) -> None:
    args = ["--no-server"] if module == "flows.serve" else []

    out = _run(module, *args, CLICKHOUSE_PORT=str(closed_port))

    _error_line(out, "CLICKHOUSE_HOST / CLICKHOUSE_PORT", f"127.0.0.1:{closed_port}")


@pytest.mark.parametrize("module", ["flows.dashboard", "flows.serve"])
def test_a_bad_setting(stack: Stack, module: str) -> None:
    args = ["--no-server"] if module == "flows.serve" else []

    out = _run(module, *args, PIPELINE_ALERT_QUERY_SECONDS="slow")

    _error_line(out, "invalid setting PIPELINE_ALERT_QUERY_SECONDS")


def test_serve_checks_mongo_before_serving(stack: Stack) -> None:
    uri = stack.mongo_uri.replace("mongodb://", "mongodb://nobody:not-the-password@")

    out = _run("flows.serve", "--no-server", MONGO_URI=uri)

    _error_line(out, "MONGO_URI", "refused the credentials")
    assert "not-the-password" not in out.stderr


def test_verbose_adds_the_traceback(stack: Stack, closed_port: int) -> None:
    out = _run("flows.dashboard", "--verbose", CLICKHOUSE_PORT=str(closed_port))

    assert out.returncode == 2
    assert "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.serve", "flows.dashboard"])
def test_help_says_how_errors_are_reported(module: str) -> None:
    out = _run(module, "--help")

    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "--verbose" in text and "traceback" in text
