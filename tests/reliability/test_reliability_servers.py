"""Scenario 2: a server fails under a running sync; the rerun leaves ClickHouse exact.

- the ClickHouse server process is SIGKILLed right when the loader starts an insert, then
  restarted on the same data dir;
- mongod is SIGKILLed mid-sync and restarted;
- the primary steps down (single-node replica set: `replSetStepDown` with `force`, it re-elects
  itself when the step-down period ends).
All on a private stack (`fault_stack`), so the session's servers are never touched. The fast
variants run one trial each; `make reliability` runs five, at different batches.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Report, assert_all_ok
from pymongo.errors import AutoReconnect, ConnectionFailure
from world import World, restart

from loader.synthetic import mutate

TASKS = 8_000
BATCH = 400
# Quick give-up in the loader under test, so a trial does not wait out long backoffs.
WORKER_ENV = {
    "LOADER_RETRY_ATTEMPTS": "3",
    "LOADER_RETRY_INITIAL_WAIT": "0.2",
    "LOADER_RETRY_MAX_WAIT": "1",
    "LOADER_CONNECT_TIMEOUT": "2",
}


def fault_during_sync(
    world: World, phase: str, target: int, fault: Callable[[], None]
) -> tuple[int, str]:
    """Run the loader in a subprocess, inject `fault` when it reaches `phase target`, let it
    finish or fail on its own; return its exit code and stderr."""
    proc = world.spawn("sync", "--batch-size", str(BATCH), extra_env=WORKER_ENV)
    assert proc.stdout is not None and proc.stderr is not None
    injected = False
    try:
        for line in proc.stdout:
            word, _, arg = line.strip().partition(" ")
            if not injected and word == phase and arg.isdigit() and int(arg) == target:
                fault()
                injected = True
        proc.wait(300)
        return proc.returncode, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()


def finish_and_compare(world: World, report: Report, scenario: str, dbt_dir: Path) -> None:
    started = time.monotonic()
    world.reconnect_clickhouse()
    mutate(world.db, 40, seed=77)
    world.db.tasks.delete_many({"_id": {"$in": [d["_id"] for d in world.db.tasks.find().limit(7)]}})
    world.load()
    comparisons = world.compare_raw(("tasks", "employee"))
    comparisons += world.build_and_compare_models(dbt_dir)
    report.record(scenario, comparisons, time.monotonic() - started)
    assert_all_ok(comparisons)


def kill_clickhouse(world: World) -> Callable[[], None]:
    def fault() -> None:
        world.stack.kill("clickhouse")
        time.sleep(1.0)
        restart(world.stack, "clickhouse")

    return fault


def restart_mongod(world: World) -> Callable[[], None]:
    def fault() -> None:
        world.stack.kill("mongo")
        world.mongo.close()  # our pooled sockets would keep the port busy
        restart(world.stack, "mongo")
        world.reconnect_mongo()

    return fault


def step_down(world: World) -> Callable[[], None]:
    def fault() -> None:
        # The stepping-down primary may drop our connection: that is the point.
        with contextlib.suppress(AutoReconnect, ConnectionFailure):
            world.mongo.admin.command("replSetStepDown", 2, force=True)

    return fault


FAULTS = {
    "clickhouse killed mid-insert": ("insert", kill_clickhouse),
    "mongod restarted mid-sync": ("stored", restart_mongod),
    "primary step-down mid-sync": ("stored", step_down),
}


def run_trials(
    world: World, report: Report, name: str, trials: int, tmp_path: Path, seed: int
) -> None:
    phase, make_fault = FAULTS[name]
    rng = random.Random(seed)
    targets = rng.sample(range(2, TASKS // BATCH - 1), trials)
    for trial, target in enumerate(targets):
        world.reset()
        world.seed(TASKS, seed_no=seed + trial)
        world.sync("employee")
        code, stderr = fault_during_sync(world, phase, target, make_fault(world))
        print(f"{name}, batch {target}: loader exited {code}; {stderr.strip()[-300:]}")
        label = f"2 {name}" + (f" x{trials}" if trials > 1 else " (fast)")
        finish_and_compare(world, report, label, tmp_path / f"dbt{trial}")


@pytest.mark.parametrize("name", list(FAULTS))
def test_server_fault_mid_sync_then_rerun_is_exact(
    fault_world: World, report: Report, tmp_path: Path, name: str
) -> None:
    run_trials(fault_world, report, name, 1, tmp_path, seed=5)


@pytest.mark.slow
@pytest.mark.timeout(3_600)
@pytest.mark.parametrize("name", list(FAULTS))
def test_server_fault_at_five_points_then_rerun_is_exact(
    fault_world: World, report: Report, tmp_path: Path, name: str
) -> None:
    run_trials(fault_world, report, name, 5, tmp_path, seed=50)


def test_killed_clickhouse_comes_back_with_its_rows(fault_world: World) -> None:
    fault_world.seed(500)
    fault_world.sync("tasks")
    before = fault_world.ch.command("SELECT count() FROM raw.tasks FINAL")

    kill_clickhouse(fault_world)()
    fault_world.reconnect_clickhouse()

    assert fault_world.ch.command("SELECT count() FROM raw.tasks FINAL") == before == 500
