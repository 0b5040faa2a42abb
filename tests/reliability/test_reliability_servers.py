"""Scenario 2: a server fails under a running sync; the rerun leaves ClickHouse exact.

- the ClickHouse server process is SIGKILLed while the loader holds a batch it has read but not
  yet written (its `insert` fault point), then restarted on the same data dir once the loader has
  met the dead server;
- mongod is SIGKILLed while the loader is between batches (`saved`: watermark saved, next read
  not started) and restarted once the loader has met it;
- the primary steps down at the same point (single-node replica set: `replSetStepDown` with
  `force`; it re-elects itself when the step-down period ends).
The loader pauses at its fault point (`worker.py`), so every fault lands where its name says,
and each trial checks that it did: the server refused connections (or was not primary) while the
loader was alive and then ran on. All on a private stack (`fault_stack`), so the session's servers
are never touched. The fast variants run one trial each; `make reliability` runs five, at
different batches.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Report, assert_all_ok
from pymongo import MongoClient
from pymongo.errors import AutoReconnect, ConnectionFailure
from world import LoaderProcess, World, port_refuses, restart

from synthetic import mutate

TASKS = 8_000
BATCH = 400
# Quick give-up in the loader under test, so a trial does not wait out long backoffs.
WORKER_ENV = {
    "LOADER_RETRY_ATTEMPTS": "3",
    "LOADER_RETRY_INITIAL_WAIT": "0.2",
    "LOADER_RETRY_MAX_WAIT": "1",
    "LOADER_CONNECT_TIMEOUT": "2",
}
STEP_DOWN_SECONDS = 5


@dataclass(frozen=True)
class Fault:
    """A server fault injected while the loader waits at `phase`: `inject` takes the server
    down and returns what shows it is down; `heal` brings it back once the loader met it."""

    phase: str
    inject: Callable[[World], str]
    heal: Callable[[World], None]
    wait_for_retry: bool = True  # the loader must report a transient error before `heal`


def kill_clickhouse(world: World) -> str:
    world.stack.kill("clickhouse")
    assert port_refuses(world.stack.clickhouse_host, world.stack.clickhouse_port)
    return "ClickHouse refuses connections"


def restart_clickhouse(world: World) -> None:
    restart(world.stack, "clickhouse")


def kill_mongod(world: World) -> str:
    world.stack.kill("mongo")
    world.mongo.close()  # our pooled sockets would keep the port busy
    assert port_refuses("127.0.0.1", world.stack.mongo_port)
    return "mongod refuses connections"


def restart_mongod(world: World) -> None:
    restart(world.stack, "mongo")
    world.reconnect_mongo()


def step_down(world: World) -> str:
    # The stepping-down primary may drop our connection: that is the point.
    with contextlib.suppress(AutoReconnect, ConnectionFailure):
        world.mongo.admin.command("replSetStepDown", STEP_DOWN_SECONDS, force=True)
    assert not is_primary(world)
    return "mongod is not primary"


def is_primary(world: World) -> bool:
    direct: MongoClient = MongoClient(
        "127.0.0.1", world.stack.mongo_port, directConnection=True, serverSelectionTimeoutMS=5_000
    )
    with direct:
        return bool(direct.admin.command("hello").get("isWritablePrimary"))


def wait_for_primary(world: World) -> None:
    deadline = time.monotonic() + 120
    while not is_primary(world):
        assert time.monotonic() < deadline, "mongod did not become primary again"
        time.sleep(0.5)


FAULTS = {
    "clickhouse killed mid-insert": Fault("insert", kill_clickhouse, restart_clickhouse),
    "mongod killed between batches": Fault("saved", kill_mongod, restart_mongod),
    # Whether the loader notices a 5 s step-down depends on its next read: not asserted.
    "primary step-down mid-sync": Fault("saved", step_down, wait_for_primary, wait_for_retry=False),
}


def fault_during_sync(world: World, fault: Fault, target: int) -> tuple[int, str]:
    """Run the loader in a subprocess paused at `fault.phase target`, inject the fault, let the
    loader run on into it, heal, and let it finish or fail on its own. Returns the exit status
    and what showed the fault; fails when the fault did not land while the loader ran."""
    loader = LoaderProcess(world, BATCH, pause_at=(fault.phase, target), extra_env=WORKER_ENV)
    try:
        loader.wait_for(f"{fault.phase} {target}")
        evidence = fault.inject(world)
        assert loader.alive(), "the loader was not running when the fault was injected"
        loader.resume()
        if fault.wait_for_retry:
            evidence += "; the loader met it: " + loader.wait_for_retry()
        fault.heal(world)
        status = loader.finish()
        print(f"loader exited {status}; {loader.stderr().strip()[-300:]}")
        return status, evidence
    finally:
        loader.close()


def finish_and_compare(
    world: World, report: Report, scenario: str, dbt_dir: Path, evidence: str
) -> None:
    started = time.monotonic()
    world.reconnect_clickhouse()
    mutate(world.db, 40, seed=77)
    world.db.tasks.delete_many({"_id": {"$in": [d["_id"] for d in world.db.tasks.find().limit(7)]}})
    comparisons = world.rerun_and_compare(("tasks", "employee"))
    comparisons += world.build_and_compare_models(dbt_dir)
    report.record(scenario, comparisons, time.monotonic() - started, faults=1)
    print(f"{scenario}: {evidence}")
    assert_all_ok(comparisons)


def run_trials(
    world: World, report: Report, name: str, trials: int, tmp_path: Path, seed: int
) -> None:
    fault = FAULTS[name]
    rng = random.Random(seed)
    targets = rng.sample(range(2, TASKS // BATCH - 1), trials)
    for trial, target in enumerate(targets):
        world.reset()
        world.seed(TASKS, seed_no=seed + trial)
        world.sync("employee")
        _, evidence = fault_during_sync(world, fault, target)
        label = f"2 {name}" + (f" x{trials}" if trials > 1 else " (fast)")
        finish_and_compare(world, report, label, tmp_path / f"dbt{trial}", evidence)


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

    kill_clickhouse(fault_world)
    restart_clickhouse(fault_world)
    fault_world.reconnect_clickhouse()

    assert fault_world.ch.command("SELECT count() FROM raw.tasks FINAL") == before == 500
