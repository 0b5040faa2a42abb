"""`python -m flows.pipeline` with nothing to do: recorded without Prefect (flows/once.py).

Each run is a subprocess whose imports are listed (`-X importtime`); its Prefect API points at
a closed port, so a run that did need Prefect could not pass unnoticed either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from devstack.process import free_ports
from flows.pipeline import sync_pipeline
from synthetic import mutate

if TYPE_CHECKING:  # fixtures' types, from this suite's conftest.py
    from conftest import Pipeline

pytestmark = pytest.mark.timeout(900)


def run_cli(*args: str, prefect_api: str | None = None) -> tuple[dict[str, Any], set[str]]:
    """`python -m flows.pipeline`: its summary, and the modules it imported (from
    `-X importtime`, which lists every module a process imports)."""
    if prefect_api is None:  # nowhere: a run that starts Prefect fails
        prefect_api = f"http://127.0.0.1:{free_ports(1)[0]}/api"
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flows.pipeline", "--json", *args],
        env=os.environ | {"PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in out.stderr.splitlines()
        if line.startswith("import time:")
    }
    lines = out.stdout.splitlines()  # Prefect's log lines, if it ran, then the summary
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:])), imported


def skipped_rows(pipeline: Pipeline, run_id: str) -> list[dict[str, Any]]:
    return pipeline.rows(
        "SELECT collection, status, message FROM ops.sync_runs WHERE run_id = {r:String} "
        "ORDER BY collection",
        r=run_id,
    )


def test_a_run_with_nothing_to_do_records_its_skip_without_prefect(pipeline: Pipeline) -> None:
    assert sync_pipeline()["status"] == "ok"

    summary, imported = run_cli()

    assert "prefect" not in imported
    assert summary["status"] == "skipped"
    assert summary["prefect"] is False
    assert summary["message"].startswith("skipped: no changes since the last sync; in step")
    rows = skipped_rows(pipeline, summary["run_id"])
    assert [(r["collection"], r["status"]) for r in rows] == [
        ("employee", "skipped"),
        ("tasks", "skipped"),
    ]
    assert {r["message"] for r in rows} == {summary["message"]}
    # The same bookkeeping as a skipped flow run: both sides counted, steps timed.
    drift = pipeline.rows(
        "SELECT collection, mongo_count, clickhouse_count FROM ops.drift_checks "
        "WHERE run_id = {r:String} ORDER BY collection",
        r=summary["run_id"],
    )
    assert [d["collection"] for d in drift] == ["employee", "tasks"]
    assert all(d["mongo_count"] == d["clickhouse_count"] for d in drift)
    steps = pipeline.rows(
        "SELECT step, status FROM ops.step_timings WHERE run_id = {r:String}",
        r=summary["run_id"],
    )
    assert {s["step"]: s["status"] for s in steps} == {
        "guard": "ok",
        "detect_changes": "skipped",
        "check_drift": "ok",
    }


def test_a_run_finding_the_lock_taken_is_skipped_without_prefect(pipeline: Pipeline) -> None:
    import redis

    assert sync_pipeline()["status"] == "ok"
    client = redis.Redis.from_url(pipeline.settings.redis_url, decode_responses=True)
    key = pipeline.settings.key("lock", "sync")
    client.set(key, "another-run", ex=60)
    try:
        summary, imported = run_cli()
    finally:
        client.delete(key)
        client.close()

    assert "prefect" not in imported
    assert summary["status"] == "skipped"
    assert "another run holds the lock (another-run)" in summary["message"]
    assert {r["status"] for r in skipped_rows(pipeline, summary["run_id"])} == {"skipped"}


def test_a_run_with_something_to_do_goes_through_the_flow(pipeline: Pipeline) -> None:
    from prefect.settings import PREFECT_API_URL

    assert sync_pipeline()["status"] == "ok"
    mutate(pipeline.db, 5, seed=3, now=datetime.now(UTC))

    summary, imported = run_cli(prefect_api=PREFECT_API_URL.value())

    assert "prefect" in imported
    assert summary["status"] == "ok"
    assert "tasks" in summary["changed"]
    assert "prefect" not in summary


def test_a_run_right_after_a_write_is_a_no_op(pipeline: Pipeline) -> None:
    assert sync_pipeline()["status"] == "ok"
    mutate(pipeline.db, 5, seed=4, now=datetime.now(UTC))
    assert sync_pipeline()["status"] == "ok"  # loads and builds the write

    # The write lies inside the overlap window, which the next sync would re-read.
    summary, imported = run_cli()

    assert summary["status"] == "skipped"
    assert "prefect" not in imported and "dbt" not in imported


def test_a_delete_is_seen_by_a_run_without_writes(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL

    # No overlap window: the seeded documents' ids count on both sides at once.
    monkeypatch.setenv("LOADER_OVERLAP_SECONDS", "0")
    assert sync_pipeline()["status"] == "ok"
    gone = pipeline.db.tasks.find_one_and_delete({})
    assert gone is not None

    summary, imported = run_cli(prefect_api=PREFECT_API_URL.value())

    assert "prefect" in imported  # handed to the flow, which reconciles it
    assert summary["status"] == "ok"
    deleted = pipeline.scalar(
        "SELECT is_deleted FROM raw.tasks FINAL WHERE _id = {i:String}", i=str(gone["_id"])
    )
    assert deleted == 1
