"""Every model lands in the database `analytics` (the contract), whatever the profile's schema:
`+schema: analytics` with macros/generate_schema_name.sql, which takes a custom schema as the
database name instead of dbt's default `<target schema>_<custom schema>`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DBT = Path(sys.executable).with_name("dbt")


def test_models_land_in_analytics_whatever_the_profile_schema(tmp_path: Path) -> None:
    profile = (REPO / "profiles.yml.example").read_text()
    assert "schema: analytics" in profile
    (tmp_path / "profiles.yml").write_text(profile.replace("schema: analytics", "schema: other"))
    env = {
        **os.environ,
        "DBT_PROFILES_DIR": str(tmp_path),
        "DBT_TARGET": "dev",
        "DBT_TARGET_PATH": str(tmp_path / "target"),
        "DBT_LOG_PATH": str(tmp_path / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_PARTIAL_PARSE": "false",
    }
    listed = subprocess.run(
        [str(DBT), "ls", "--project-dir", str(REPO), "--resource-type", "model"]
        + ["--output", "json", "--output-keys", "name", "schema", "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert listed.returncode == 0, listed.stdout[-3000:] + listed.stderr[-3000:]
    schemas = {
        node["name"]: node["schema"]
        for node in map(json.loads, listed.stdout.splitlines())
        if node.get("name")
    }
    assert "task_events" in schemas and "pipeline_state" in schemas
    assert {name: s for name, s in schemas.items() if s != "analytics"} == {}
