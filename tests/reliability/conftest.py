"""Fixtures of the reliability suite: a clean world per scenario, private stacks for the
scenarios that kill servers, and the session's results table (printed at the end of the run and
written to `.data/reliability/latest.json`, or to `$RELIABILITY_REPORT`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Report
from world import RELIABILITY_DB, World, emptied_world

from devstack.stack import Stack, start_on_free_ports

REPORT_KEY = pytest.StashKey[Report]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT_KEY] = Report()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash.get(REPORT_KEY, None)
    if report is None or not report.scenarios:
        return
    terminalreporter.section("reliability: MongoDB vs ClickHouse, per scenario")
    terminalreporter.write_line(report.table())
    path = Path(
        os.environ.get("RELIABILITY_REPORT", REPO / ".data" / "reliability" / "latest.json")
    )
    report.write_json(path)
    terminalreporter.write_line(f"(written to {path})")


@pytest.fixture(scope="session")
def report(pytestconfig: pytest.Config) -> Report:
    return pytestconfig.stash[REPORT_KEY]


@pytest.fixture
def world(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """The session stack, emptied; MONGO_DB points at this suite's database."""
    monkeypatch.setenv("MONGO_DB", RELIABILITY_DB)
    with emptied_world(stack, Path(os.environ.get("PIPELINE_DATA_DIR", tmp_path))) as w:
        yield w


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private stack whose servers the scenarios kill, so the session stack stays intact."""
    private = start_on_free_ports(tmp_path_factory.mktemp("fault_stack"))
    try:
        yield private
    finally:
        for name in ("mongo", "clickhouse", "redis"):
            # Bring back anything a failed scenario left down, so `down` stops it cleanly.
            with contextlib.suppress(Exception):
                private.start(name)
        private.down()


@pytest.fixture
def fault_world(fault_stack: Stack, tmp_path: Path) -> Iterator[World]:
    with emptied_world(fault_stack, tmp_path) as w:
        yield w
