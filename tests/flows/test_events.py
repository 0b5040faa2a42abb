"""Event-driven mode: change signals in a Redis stream wake a runner; they are durable."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
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


def test_the_hot_path_shows_a_task_write_on_the_dashboard_without_a_flow_run(
    pipeline: Any,
) -> None:
    """With the store built once, the follower alone carries a new task to the dashboard's
    panels (through the cache, whose data version it bumps): no signal, no flow run."""
    import time

    from flows.dashboard import PANELS, collect
    from flows.events import follow_and_signal
    from flows.pipeline import sync_pipeline
    from flows.redis_link import RedisLink

    settings = pipeline.settings
    log = logging.getLogger("test")
    sync_pipeline()
    runs = pipeline.scalar("SELECT uniqExact(run_id) FROM ops.step_timings")
    panel = tuple(p for p in PANELS if p.name == "files_by_stage_status")
    link = RedisLink(settings, log)

    def files(stage: str, status: str) -> int:
        rows = collect(settings, link, pipeline.ch, log, panel)[0].rows
        return sum(r["files"] for r in rows if (r["stage"], r["status"]) == (stage, status))

    before = files("intake", "assigned")
    assert collect(settings, link, pipeline.ch, log, panel)[0].hit  # cached from here on
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_and_signal, args=(settings, "tasks", stop, log), daemon=True
    )
    follower.start()
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
        follower.join(timeout=30)
        link.close()

    assert seen == before + 1
    assert connect(settings).xlen(stream_key(settings)) == 0
    assert pipeline.scalar("SELECT uniqExact(run_id) FROM ops.step_timings") == runs
