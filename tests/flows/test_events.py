"""Event-driven mode: change signals in a Redis stream wake a runner; they are durable."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from testkit import new_task

from flows.events import GROUP, connect, run_on_signals, signal_change, stream_key
from flows.settings import FlowSettings


@pytest.fixture
def settings(stack: Any) -> FlowSettings:
    return FlowSettings(redis_prefix=f"test-events-{uuid.uuid4().hex[:8]}")


def serve_until(
    settings: FlowSettings, run: Callable[[list[dict[str, str]]], Any], runs: int = 1
) -> list[list[dict[str, str]]]:
    """Run a runner until it has made `runs` calls to `run`; return the signals of each."""
    stop = threading.Event()
    calls: list[list[dict[str, str]]] = []

    def record(signals: list[dict[str, str]]) -> Any:
        calls.append(signals)
        try:
            return run(signals)
        finally:
            if len(calls) == runs:
                stop.set()

    thread = threading.Thread(
        target=run_on_signals,
        args=(settings, record, stop, logging.getLogger("test")),
        kwargs={"block_ms": 200},
    )
    thread.start()
    thread.join(timeout=60)
    stop.set()
    thread.join()
    return calls


def test_a_signalled_change_starts_a_run(settings: FlowSettings) -> None:
    signal_change(connect(settings), settings, "tasks", op="update")

    calls = serve_until(settings, lambda signals: None)

    assert [[s["collection"] for s in signals] for signals in calls] == [["tasks"]]


def test_signals_waiting_before_a_run_are_served_by_one_run(settings: FlowSettings) -> None:
    client = connect(settings)
    for collection in ("tasks", "tasks", "employee"):
        signal_change(client, settings, collection)

    calls = serve_until(settings, lambda signals: None)

    assert len(calls) == 1
    assert sorted(s["collection"] for s in calls[0]) == ["employee", "tasks", "tasks"]


def test_signal_of_a_failed_run_stays_pending_for_the_next_runner(settings: FlowSettings) -> None:
    client = connect(settings)
    signal_change(client, settings, "employee")

    def fail(signals: list[dict[str, str]]) -> None:
        raise RuntimeError("run failed")

    serve_until(settings, fail)
    assert client.xpending(stream_key(settings), GROUP)["pending"] == 1

    calls = serve_until(settings, lambda signals: None)

    assert [s["collection"] for s in calls[0]] == ["employee"]
    assert client.xpending(stream_key(settings), GROUP)["pending"] == 0


def test_a_failed_signalled_run_is_retried_with_its_signals_until_it_succeeds(
    settings: FlowSettings,
) -> None:
    client = connect(settings)
    signal_change(client, settings, "tasks")
    quick = settings.model_copy(update={"task_retry_delay_seconds": 0.01})
    failed: list[bool] = []

    def fail_once(signals: list[dict[str, str]]) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("the first run fails")

    calls = serve_until(quick, fail_once, runs=2)

    assert [[s["collection"] for s in signals] for signals in calls] == [["tasks"], ["tasks"]]
    assert client.xpending(stream_key(settings), GROUP)["pending"] == 0


def test_the_change_follower_signals_a_change_and_marks_its_build_pending(
    settings: FlowSettings, stack: Any
) -> None:
    import time

    import clickhouse_connect
    from pymongo import MongoClient

    from flows.events import follow_and_signal
    from loader.build_pending import clear_build_pending, pending_builds
    from loader.schema import ensure_schema
    from loader.settings import Settings

    loader_settings = Settings()
    db = MongoClient(loader_settings.mongo_uri)[loader_settings.mongo_db]
    ch = clickhouse_connect.get_client(host=settings.clickhouse_host, port=settings.clickhouse_port)
    ensure_schema(ch)
    clear_build_pending(ch, ["employee"], "test", build_started_at=datetime.now(UTC))
    client = connect(settings)
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_and_signal, args=(settings, "employee", stop, logging.getLogger("test"))
    )
    follower.start()
    try:
        # The follower starts from "now": write until its stream has seen a change.
        deadline = time.monotonic() + 60
        while client.xlen(stream_key(settings)) == 0 and time.monotonic() < deadline:
            db.employee.insert_one({"employee_code": f"E-{uuid.uuid4().hex[:6]}"})
            time.sleep(0.5)
    finally:
        stop.set()
        follower.join()

    entries = client.xrange(stream_key(settings))
    assert entries and entries[0][1]["collection"] == "employee"
    assert "employee" in pending_builds(ch, ["employee"])


def _new_task_on_the_cached_dashboard(
    pipeline: Any, follower: Callable[[threading.Event], Callable[[], None]]
) -> tuple[int, int]:
    """After the caller's flow run, with the dashboard's `files_by_stage_status` panel cached,
    start `follower(stop)` (it returns how to wait for its end once `stop` is set), write a new
    `intake` task once its stream is open, and read the panel through the cache until it
    changes (or 60 s): the panel's count of assigned intake files before and after."""
    import time

    from flows.dashboard import PANELS, collect
    from flows.redis_link import RedisLink

    settings = pipeline.settings
    log = logging.getLogger("test")
    panel = tuple(p for p in PANELS if p.name == "files_by_stage_status")
    link = RedisLink(settings, log)

    def files(stage: str, status: str) -> int:
        rows = collect(settings, link, pipeline.ch, log, panel)[0].rows
        return sum(r["files"] for r in rows if (r["stage"], r["status"]) == (stage, status))

    before = files("intake", "assigned")
    assert collect(settings, link, pipeline.ch, log, panel)[0].hit  # cached from here on
    stop = threading.Event()
    wait_for_end = follower(stop)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not pipeline.scalar(
            "SELECT count() FROM ops.change_stream_state WHERE collection = 'tasks'"
        ):
            time.sleep(0.1)  # the follower's stream is open once it has saved a position
        employee = pipeline.db.employee.find_one({})
        pipeline.db.tasks.insert_one(new_task("HOT-PATH-1", employee))
        seen = before
        while time.monotonic() < deadline and seen == before:
            time.sleep(0.1)
            seen = files("intake", "assigned")
    finally:
        stop.set()
        wait_for_end()
        link.close()
    return before, seen


def test_the_hot_path_shows_a_task_write_on_the_dashboard_without_a_flow_run(
    pipeline: Any,
) -> None:
    """With the store built once, the service's follower alone carries a new task to the
    dashboard's panels (through the cache, whose data version it bumps): no signal, no flow
    run."""
    from flows.events import follow_and_signal
    from flows.pipeline import sync_pipeline

    def service_follower(stop: threading.Event) -> Callable[[], None]:
        args = (pipeline.settings, "tasks", stop, logging.getLogger("test"))
        thread = threading.Thread(target=follow_and_signal, args=args, daemon=True)
        thread.start()
        return lambda: thread.join(timeout=30)

    sync_pipeline()
    runs = pipeline.scalar("SELECT uniqExact(run_id) FROM ops.step_timings")
    before, seen = _new_task_on_the_cached_dashboard(pipeline, service_follower)

    assert seen == before + 1
    assert connect(pipeline.settings).xlen(stream_key(pipeline.settings)) == 0
    assert pipeline.scalar("SELECT uniqExact(run_id) FROM ops.step_timings") == runs


def test_a_loader_watch_started_by_hand_also_refreshes_the_cached_dashboard(
    pipeline: Any, tmp_path: Path
) -> None:
    """`python -m loader watch --all-changes`, run by hand, bumps the dashboard cache's data
    version after each settled batch as the service's follower does: a cached panel shows a
    new task without waiting for a flow run."""
    import os
    import signal
    import subprocess
    import sys

    from flows.pipeline import sync_pipeline

    log_path = tmp_path / "watch.log"
    watches: list[subprocess.Popen[bytes]] = []

    def hand_started_watch(stop: threading.Event) -> Callable[[], None]:
        command = ["-m", "loader", "watch", "--collection", "tasks", "--all-changes"]
        with log_path.open("wb") as log:
            watches.append(
                subprocess.Popen(
                    [sys.executable, *command], env=dict(os.environ), stdout=log, stderr=log
                )
            )

        def end() -> None:
            watches[0].send_signal(signal.SIGTERM)
            try:
                watches[0].wait(timeout=30)
            finally:
                if watches[0].poll() is None:
                    watches[0].kill()

        return end

    sync_pipeline()
    before, seen = _new_task_on_the_cached_dashboard(pipeline, hand_started_watch)

    assert watches[0].returncode == 0, log_path.read_text()  # ran until SIGTERM stopped it
    assert seen == before + 1
