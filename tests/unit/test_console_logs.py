"""What `python -m flows.pipeline` leaves on the console when a run fails: its own one error
line, not Prefect's repr of the same exception above it."""

from __future__ import annotations

import logging

import pytest

from flows.once import _without_run_failures


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "Encountered exception", None, None)


@pytest.mark.parametrize("name", ["prefect.flow_runs", "prefect.task_runs"])
def test_prefects_report_of_a_failed_run_is_left_off_the_console(name: str) -> None:
    assert not _without_run_failures(_record(name, logging.ERROR))


@pytest.mark.parametrize(
    ("name", "level"),
    [("prefect.task_runs", logging.WARNING), ("loader.sync", logging.ERROR)],
)
def test_warnings_and_the_projects_own_errors_stay(name: str, level: int) -> None:
    assert _without_run_failures(_record(name, level))
