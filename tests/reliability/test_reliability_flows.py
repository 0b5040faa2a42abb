"""Scenarios 3 and 6 (flow side): Redis killed while a flow run is in progress, and two flow
runs started at once. Each ends with the exact comparison of raw, task_events and
pipeline_state against MongoDB (the flow itself ran the loader and dbt), and with a check that
no reconcile the flow ran (it reconciles a collection whose counts differ) had to load a
document: only deletes are for reconcile to find; the rest must come through the syncs."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import (
    REPO,
    Comparison,
    Report,
    assert_all_ok,
    compare_pipeline_state,
    compare_task_events,
)
from testkit import Captured, captured_run_logs, flow_runs_meeting_at_the_lock
from world import World, port_refuses, restart

from synthetic import mutate

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """Prefect's test harness, unless one is already serving this session (the flows suite's)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def flow_world(
    world: World, prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> World:
    private = uuid.uuid4().hex[:8]
    shutil.copy(REPO / "profiles.yml.example", tmp_path / "profiles.yml")
    monkeypatch.setenv("PIPELINE_DBT_PROFILES_DIR", str(tmp_path))
    monkeypatch.setenv("PIPELINE_DBT_TARGET_PATH", str(tmp_path / "target"))
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PIPELINE_REDIS_PREFIX", f"rel-{private}")
    monkeypatch.setenv("PIPELINE_CONCURRENCY_LIMIT_NAME", f"rel-{private}")
    monkeypatch.setenv("PIPELINE_TASK_RETRY_DELAY_SECONDS", "0.2")
    world.seed(3_000)
    return world


@pytest.fixture
def run_warnings() -> Iterator[Captured]:
    """Warnings of Prefect's run loggers during the test."""
    with captured_run_logs(logging.WARNING, configure_prefect=True) as handler:
        yield handler


def compare_everything(world: World) -> list[Any]:
    comparisons = world.compare_raw(("tasks", "employee"))
    truth = world.truth("tasks")
    return comparisons + [
        compare_task_events(world.ch, truth),
        compare_pipeline_state(world.ch, truth),
        reconciles_loaded_nothing(world),
    ]


def reconciles_loaded_nothing(world: World) -> Comparison:
    """Every reconcile recorded so far (the world starts empty) only tombstoned: a document it
    loaded or rejected is one the flow's syncs missed."""
    rows = world.ch.query(
        "SELECT run_id, collection, rows_written, rejects, message FROM ops.sync_runs "
        "WHERE kind = 'reconcile' AND (rows_written > 0 OR rejects > 0)"
    ).result_rows
    out = Comparison("reconciles of the flow runs", lost=sum(r[2] + r[3] for r in rows))
    for row in rows:
        out.note(f"reconcile {row[0]} of {row[1]} loaded what the sync missed: {row[4][:200]}")
    return out


def test_redis_killed_during_a_flow_run_completes_bypassing_the_cache_with_one_warning(
    flow_world: World, report: Report, run_warnings: Captured
) -> None:
    from flows.pipeline import sync_pipeline
    from flows.settings import FlowSettings

    settings = FlowSettings()
    lock_key = settings.key("lock", "sync")
    watcher = redis.Redis.from_url(flow_world.stack.redis_url)
    started = time.monotonic()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["summary"] = sync_pipeline()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # The run holds the Redis lock: it is past the guard and about to load.
        deadline = time.monotonic() + 120
        while not watcher.exists(lock_key) and thread.is_alive():
            assert time.monotonic() < deadline, "the run never took the Redis lock"
            time.sleep(0.05)
        flow_world.stack.kill("redis")
        # The fault landed: Redis was down while the run was still in progress.
        assert port_refuses("127.0.0.1", flow_world.stack.redis_port)
        assert thread.is_alive(), "the run had ended before Redis was killed"
        thread.join(600)
    finally:
        watcher.close()
        restart(flow_world.stack, "redis")

    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    comparisons = compare_everything(flow_world)
    report.record(
        "3 redis killed during a flow run", comparisons, time.monotonic() - started, faults=1
    )
    assert_all_ok(comparisons)
    assert summary["status"] == "ok"
    assert summary["data_version"] is None  # the cache was bypassed, not bumped
    redis_warnings = [r.getMessage() for r in run_warnings.records if "Redis" in r.getMessage()]
    assert len(redis_warnings) == 1, redis_warnings


def test_two_overlapping_flow_runs_twice_leave_no_duplicate_and_lose_nothing(
    flow_world: World, report: Report
) -> None:
    from flows.pipeline import sync_pipeline
    from flows.settings import FlowSettings

    def run_or_failure() -> dict[str, Any]:
        try:
            return sync_pipeline()
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            return {"status": f"failed: {type(exc).__name__}: {exc}"[:300]}

    def more_work(attempt: int) -> None:
        mutate(flow_world.db, 30, seed=40 + attempt)

    settings, ch = FlowSettings(), flow_world.ch
    started = time.monotonic()
    for round_no in range(2):
        if round_no:
            mutate(flow_world.db, 60, seed=21)
            gone = [d["_id"] for d in flow_world.db.tasks.find().limit(10)]
            flow_world.db.tasks.delete_many({"_id": {"$in": gone}})
        # One run holds the lock for its whole load and build; the other, started meanwhile,
        # finds the lock taken and is skipped, naming the run that holds it.
        first, second = flow_runs_meeting_at_the_lock(run_or_failure, settings, ch, more_work)
        assert (first["status"], second["status"]) == ("ok", "skipped"), (first, second)
        assert first["run_id"] in second["message"]
    # Deletes of round 2 reached ClickHouse through the ok run's own drift check and reconcile.
    comparisons = compare_everything(flow_world)
    report.record(
        "6 two overlapping flow runs (x2)", comparisons, time.monotonic() - started, faults=2
    )
    assert_all_ok(comparisons)
