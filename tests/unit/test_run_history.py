"""The run history has one query and one outcome rule (`flows.ops.last_runs_sql`): the web page
and `make dashboard` show the same outcome for every run. Evaluated by the in-process engine."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from chdb import session as chs

from flows import ops
from flows.dashboard import PANELS
from web.data import RUNS

T0 = "2026-01-01 00:00:0"
# run id -> its steps (step, kind, status); every run also has its guard.
RUNS_SEEN = {
    "run-failed": [("load:tasks", "step", "failed"), ("dbt_build", "step", "ok")],
    "run-skipped": [("guard", "step", "skipped")],
    "run-quiet": [("detect_changes", "step", "ok")],
    "run-built": [("load:tasks", "step", "ok"), ("dbt_build", "step", "ok")],
}
EXPECTED = {
    "run-failed": "failed",
    "run-skipped": "skipped",
    "run-quiet": "no changes",
    "run-built": "ok",
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[chs.Session]:
    session = chs.Session(str(tmp_path_factory.mktemp("run-history")))
    for statement in ops.ddl():
        session.query(statement)
    rows = []
    for n, (run_id, steps) in enumerate(RUNS_SEEN.items()):
        if steps[0][0] != "guard":
            steps = [("guard", "step", "ok"), *steps]
        for step, kind, status in steps:
            row = {"run_id": run_id, "step": step, "kind": kind, "status": status}
            at = {"started_at": f"{T0}{n}", "ended_at": f"{T0}{n}", "message": status}
            rows.append(json.dumps(row | at))
    session.query("INSERT INTO ops.step_timings FORMAT JSONEachRow " + "\n".join(rows))
    yield session
    session.close()


def outcomes(session: chs.Session, sql: str, run_column: str) -> dict[str, str]:
    result = session.query(sql, "JSONEachRow").bytes().decode()
    rows = [json.loads(line) for line in result.splitlines()]
    return {row[run_column][-8:]: row["outcome"] for row in rows}


def test_the_web_page_and_the_terminal_dashboard_give_each_run_the_same_outcome(
    engine: chs.Session,
) -> None:
    (panel,) = [p for p in PANELS if p.name == "last_runs"]
    expected = {run_id[-8:]: outcome for run_id, outcome in EXPECTED.items()}

    assert outcomes(engine, RUNS.sql, "run_id") == expected
    assert outcomes(engine, panel.sql, "run") == expected
