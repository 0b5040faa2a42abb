"""The project's dbt unit tests (`unit_tests:` in models/) pass against the ClickHouse front.

dbt-clickhouse runs a unit test by creating a temporary table `<test>__dbt_tmp` in its session
and never drops it (it drops `analytics.<test>__dbt_tmp`, a table that does not exist). Against
a server whose temporary tables outlive their session, the next dbt run fails with "already
exists"; against ClickHouse, each run has its own session and its own temporary tables. So the
unit tests run twice here, as two dbt invocations.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clickhouse_fronts import HOST, Front

from loader.schema import ensure_schema

REPO = Path(__file__).resolve().parents[2]
DBT = Path(sys.executable).with_name("dbt")


@pytest.fixture(scope="module")
def dbt_env(front: Front, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ensure_schema(front.client())  # the raw tables the staging views read
    workdir = tmp_path_factory.mktemp("dbt_unit")
    shutil.copy(REPO / "profiles.yml.example", workdir / "profiles.yml")
    return {
        **os.environ,
        "CLICKHOUSE_HOST": HOST,
        "CLICKHOUSE_PORT": str(front.port),
        "CLICKHOUSE_USER": "default",
        "CLICKHOUSE_PASSWORD": "",
        "DBT_TARGET": "dev",
        "DBT_PROFILES_DIR": str(workdir),
        "DBT_TARGET_PATH": str(workdir / "target"),
        "DBT_LOG_PATH": str(workdir / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_PARTIAL_PARSE": "false",
    }


# (model, unit test): every `unit_tests:` entry in models/*.yml.
UNIT_TESTS = [
    ("mart_employees", "mart_employees_keeps_one_document_per_code"),
    ("int_file_state_recomputed", "int_file_state_recomputed_ranks_by_assigned_at_then_task_id"),
    ("int_employee_workload", "int_employee_workload_counts_open_current_tasks_per_employee"),
    ("mart_file_ageing", "mart_file_ageing_buckets_time_in_stage_at_the_thresholds"),
]
UNIT_TESTED_MODELS = sorted({model for model, _ in UNIT_TESTS})


def dbt(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DBT), *args, "--project-dir", str(REPO)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_unit_tests_pass_in_two_dbt_runs_in_a_row(dbt_env: dict[str, str]) -> None:
    # The inputs of a unit test must exist (dbt reads their column types to cast the fixtures):
    # the first run builds them, and runs the unit test before building its model; the second
    # finds them.
    first = dbt(
        dbt_env,
        "build",
        "--select",
        *(f"+{model}" for model in UNIT_TESTED_MODELS),
        "test_type:unit",
        "--indirect-selection",
        "empty",  # not the data tests of the models built on the way
    )
    second = dbt(dbt_env, "test", "--select", "test_type:unit")
    for run in (first, second):
        assert run.returncode == 0, run.stdout[-4000:]
        for model, test in UNIT_TESTS:
            assert f"PASS {model}::{test}" in run.stdout, run.stdout[-4000:]
