"""`python -m flows.serve` (what `make serve` runs), as a process against the session's Prefect
API: it registers the deployment with both schedules and its concurrency limit, and with
`--events` a signalled change starts a real run of the deployment, which loads and builds,
and the signal is acknowledged only after that run finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from devstack.process import free_ports
from flows.events import GROUP, connect, signal_change, stream_key
from flows.serve import DEPLOYMENT

if TYPE_CHECKING:  # fixtures' types, from this suite's conftest.py
    from conftest import Pipeline

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)
T = TypeVar("T")


def eventually(what: str, probe: Callable[[], T | None], timeout: float = 300) -> T:
    """Poll `probe` until it returns something (bounded; not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)
    return found


@pytest.fixture
def served(pipeline: Pipeline, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m flows.serve --events --no-server` on the session's Prefect API, every hour
    and every day with reconcile."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PIPELINE_SYNC_INTERVAL_MINUTES": "60",
        "PIPELINE_RECONCILE_INTERVAL_MINUTES": "1440",
        # The served dashboard on a free port: 8050 may be taken by a `make serve` on this machine.
        "PIPELINE_WEB_PORT": str(free_ports(1)[0]),
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--events", "--no-server"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()
        print((tmp_path / "serve.log").read_text(errors="replace")[-3000:])


def deployment() -> Any:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"sync-pipeline/{DEPLOYMENT}")
        except ObjectNotFound:
            return None


def flow_runs_tagged(tag: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )


def test_serve_registers_both_schedules_and_one_run_at_a_time(
    served: subprocess.Popen[bytes],
) -> None:
    registered = eventually("the deployment is registered", deployment, timeout=180)

    schedules = sorted(
        (s.schedule.interval, s.parameters or {}) for s in registered.schedules if s.active
    )
    assert schedules == [
        (timedelta(minutes=60), {}),
        (timedelta(minutes=1440), {"reconcile": True}),
    ]
    assert registered.global_concurrency_limit.limit == 1
    assert served.poll() is None


def test_a_signalled_change_is_in_the_warehouse_when_its_deployment_run_has_finished(
    pipeline: Pipeline, served: subprocess.Popen[bytes]
) -> None:
    eventually("the deployment is registered", deployment, timeout=180)
    template = pipeline.db.tasks.find_one({}, {"_id": 0})
    changed = pipeline.db.tasks.insert_one(
        dict(template, file_id="F-signalled", updated_at=datetime.now(UTC))
    ).inserted_id
    redis_client = connect(pipeline.settings)
    signal_change(redis_client, pipeline.settings, "tasks", op="insert")

    def finished_event_run() -> Any:
        runs = [r for r in flow_runs_tagged("event-driven") if r.state and r.state.is_final()]
        return runs[0] if runs else None

    run = eventually("an event-driven run finished", finished_event_run)

    assert run.state.is_completed(), run.state
    assert run.name == "on-change-tasks"
    # It ran the pipeline (a scheduled run may have loaded the change just before it).
    guard = pipeline.rows(
        "SELECT status FROM ops.step_timings WHERE run_id = {r:String} AND step = 'guard'",
        r=str(run.id),
    )
    assert len(guard) == 1
    state = pipeline.rows(
        "SELECT task_id FROM analytics.pipeline_state WHERE file_id = 'F-signalled'"
    )
    assert state == [{"task_id": str(changed)}]
    # Acknowledged once its run was over: nothing stays pending for the next runner.
    eventually(
        "the signal is acknowledged",
        lambda: (
            True
            if redis_client.xpending(stream_key(pipeline.settings), GROUP)["pending"] == 0
            else None
        ),
        timeout=60,
    )
