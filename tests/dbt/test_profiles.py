"""profiles.yml.example: a CLICKHOUSE_PORT that is not a port fails `dbt debug`, naming it.

Jinja's `| int` turns "abc" into 0, and the ClickHouse client replaces port 0 with its default
8123: dbt used to report "All checks passed!" against whatever listened there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DBT = Path(sys.executable).with_name("dbt")


def _debug(dbt: Any, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DBT), "debug", "--project-dir", str(REPO), "--profiles-dir", str(dbt.profiles_dir)],
        env={**os.environ, **dbt.env, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("port", ["abc", "0", "65536", "8123.5", ""])
def test_dbt_debug_fails_naming_a_clickhouse_port_that_is_not_a_port(dbt: Any, port: str) -> None:
    out = _debug(dbt, CLICKHOUSE_PORT=port)

    assert out.returncode != 0
    assert "All checks passed" not in out.stdout
    assert f"CLICKHOUSE_PORT={port} is not a port number" in out.stdout


def test_dbt_debug_passes_with_the_stacks_port(dbt: Any, stack: Any) -> None:
    out = _debug(dbt, CLICKHOUSE_PORT=f" {stack.clickhouse_port} ")

    assert out.returncode == 0, out.stdout
    assert f"port: {stack.clickhouse_port}" in out.stdout
    assert "All checks passed" in out.stdout
