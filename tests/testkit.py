"""Helpers shared by several suites: a new task document, capturing Prefect's run logs, starting
a call while another runs, and running the project's modules as commands."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bson import ObjectId

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def new_task(
    file_id: str,
    employee: Mapping[str, Any] | None = None,
    at: datetime | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A valid task document as the source system writes it: a new `intake` task of `file_id`,
    assigned to `employee` (an `employee` document; a fixed one without) and stamped `at`
    (default now) for both `assigned_at` and `updated_at`; `overrides` replace any field."""
    at = at or datetime.now(UTC)
    employee = employee or {"employee_code": "E00001", "employee_name": "Ana Almeida"}
    return {
        "_id": ObjectId(),
        "file_id": file_id,
        "stage": "intake",
        "employee_code": employee["employee_code"],
        "employee_name": employee["employee_name"],
        "status": "assigned",
        "assigned_at": at,
        "updated_at": at,
        **overrides,
    }


class Captured(logging.Handler):
    """Records of Prefect's run loggers (they do not propagate to pytest's caplog)."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        super().__init__(level=level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@contextmanager
def captured_run_logs(
    level: int = logging.DEBUG, *, configure_prefect: bool = False
) -> Iterator[Captured]:
    """Capture what flow and task runs log at `level` or above while the block runs.

    `configure_prefect`: let Prefect configure logging first (it does so once per process,
    replacing handlers, so a handler attached before that would be dropped)."""
    if configure_prefect:
        from prefect.logging.configuration import setup_logging

        setup_logging()
    handler = Captured(level)
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def run_second_while_first_runs(
    call: Callable[[], T], first_is_running: Callable[[], bool], timeout_s: float = 600.0
) -> tuple[T, T]:
    """Start `call` in a thread and, once `first_is_running()` says so (or the first has
    ended), start it again in a second thread; return (first's result, second's result). An
    exception raised in either is raised here once both have ended."""
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def start(slot: int) -> None:
        try:
            results[slot] = call()
        except BaseException as exc:  # noqa: BLE001 - raised in the calling thread below
            errors.append(exc)

    first = threading.Thread(target=start, args=(0,))
    first.start()
    deadline = time.monotonic() + timeout_s
    while first.is_alive() and not first_is_running() and time.monotonic() < deadline:
        time.sleep(0.02)
    second = threading.Thread(target=start, args=(1,))
    second.start()
    for thread in (first, second):
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    assert not first.is_alive() and not second.is_alive(), f"a call ran over {timeout_s} s"
    return results[0], results[1]


def flow_runs_meeting_at_the_lock(
    run: Callable[[], dict[str, Any]],
    settings: Any,
    ch: Any,
    make_changes: Callable[[int], None],
    attempts: int = 3,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a flow run with `run`, and a second one once the first holds the run lock (its
    Redis key under `settings`); return (first, second) summaries of the first attempt in which
    the second tried the lock wholly while the first held it, as `ops.step_timings` in `ch`
    records. Prefect's SQLite API can delay a run's start by seconds (a "database is locked"
    answer is retried after 2 s, then 4 s), so the second may start only after the first has
    ended; then nothing met the lock, and after `make_changes(attempt)` (work for the next
    first run) it is tried again. Fails the test if no attempt met the lock."""
    from loader.clients import connect_redis

    redis = connect_redis(settings)
    lock_key = settings.key("lock", "sync")
    tried: list[Any] = []
    try:
        for attempt in range(attempts):
            first, second = run_second_while_first_runs(run, lambda: bool(redis.exists(lock_key)))
            assert "run_id" in first and "run_id" in second, (first, second)
            tried.append(_lock_times(ch, first["run_id"], second["run_id"]))
            held_from, held_until, tried_from, tried_until = tried[-1]
            if held_from <= tried_from and tried_until <= held_until:
                return first, second
            make_changes(attempt)
    finally:
        redis.close()
    raise AssertionError(
        f"in {attempts} attempts no second run tried the lock while it was held: "
        f"(held from, held until, tried from, tried until) = {tried}"
    )


def _lock_times(ch: Any, holder: str, other: str) -> tuple[Any, Any, Any, Any]:
    """When run `holder` held the lock (from the end of its guard step, which times taking
    it, to the end of its last step: it releases the lock after that), and when run `other`
    tried it (its guard step), from `ops.step_timings`."""
    rows = ch.query(
        "SELECT minIf(ended_at, run_id = {h:String} AND step = 'guard'), "
        "maxIf(ended_at, run_id = {h:String}), "
        "minIf(started_at, run_id = {o:String} AND step = 'guard'), "
        "maxIf(ended_at, run_id = {o:String} AND step = 'guard'), "
        "countIf(run_id = {h:String} AND step = 'guard'), "
        "countIf(run_id = {o:String} AND step = 'guard') "
        "FROM ops.step_timings WHERE run_id IN ({h:String}, {o:String})",
        parameters={"h": holder, "o": other},
    ).result_rows[0]
    assert tuple(rows[4:]) == (1, 1), f"one guard step per run: {holder}, {other}: {rows[4:]}"
    return rows[0], rows[1], rows[2], rows[3]


def run_module(*args: str, env: Mapping[str, str], timeout: float) -> str:
    """`python -m <args>` run from the repository with `env`, as a command line runs it; its
    standard output. A non-zero exit fails the test with the end of its standard error."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
