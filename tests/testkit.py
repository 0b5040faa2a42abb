"""Helpers shared by several suites: a new task document, capturing Prefect's run logs, starting
calls at once, and running the project's modules as commands."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
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


def run_at_once(call: Callable[[], T], times: int = 2, timeout_s: float | None = None) -> list[T]:
    """Run `call` in `times` threads released together (a barrier), and return what each
    returned, in the order they finished. An exception raised in a thread is raised here
    once every thread has ended."""
    barrier = threading.Barrier(times)
    results: list[T] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            results.append(call())
        except BaseException as exc:  # noqa: BLE001 - raised in the calling thread below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    if errors:
        raise errors[0]
    return results


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
