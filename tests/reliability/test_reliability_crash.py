"""Scenario 1: the loader process is SIGKILLed at random points of a large sync; the rerun
leaves ClickHouse exactly equal to MongoDB.

Every trial starts from an empty warehouse and kills the loader at a different batch, at one of
its three fault points (`worker.py`): with the batch read but not yet written (`insert`), with
the batch in ClickHouse but its watermark not saved (`stored`), or with the watermark saved and
the next read not started (`saved`). The loader pauses there, so the kill lands exactly there,
and the trial checks that the signal killed it. The source changes a little while the loader is
dead, then the rerun is judged right after its sync (only deletes may differ) and after
reconcile (which must find nothing but deletes). The fast variant runs 3 trials on a small
collection; `make reliability` runs 24 on a larger one.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Report, assert_all_ok
from world import PHASES, LoaderProcess, World

from synthetic import mutate


@dataclass(frozen=True)
class Scale:
    tasks: int
    batch: int
    trials: int


FAST = Scale(tasks=6_000, batch=400, trials=3)
SLOW = Scale(tasks=60_000, batch=2_000, trials=24)


def rng_for(test: str) -> random.Random:
    """Random kill points, reproducible with RELIABILITY_SEED (the seed is in every failure)."""
    seed = int(os.environ.get("RELIABILITY_SEED", str(random.randrange(10**6))))
    print(f"{test}: RELIABILITY_SEED={seed}")
    return random.Random(seed)


def kill_at(world: World, batch_size: int, target: int, phase: str) -> str:
    """Run the loader in a subprocess, SIGKILL it paused at `phase target`; say where it died.
    Fails unless the signal is what ended it."""
    loader = LoaderProcess(world, batch_size, pause_at=(phase, target))
    try:
        loader.wait_for(f"{phase} {target}")
        assert loader.alive(), "the loader exited at its fault point instead of pausing"
        status = loader.kill()
        assert status == -signal.SIGKILL, f"the loader ended with {status}, not by SIGKILL"
        return f"killed at {phase} {target}"
    finally:
        loader.close()


def change_source_while_down(world: World, rng: random.Random, trial: int) -> None:
    mutate(world.db, rng.randint(20, 80), seed=1_000 + trial)
    victims = [d["_id"] for d in world.db.tasks.aggregate([{"$sample": {"size": 15}}])]
    world.db.tasks.delete_many({"_id": {"$in": victims}})


def run_sigkill_trials(
    world: World, report: Report, scale: Scale, scenario: str, dbt_dir: Path
) -> None:
    rng = rng_for(scenario)
    world.seed(scale.tasks)
    batches = scale.tasks // scale.batch
    targets = sorted(rng.sample(range(1, batches), scale.trials))
    failures = []
    for trial, target in enumerate(targets):
        started = time.monotonic()
        for database in ("raw", "ops"):
            world.ch.command(f"DROP DATABASE IF EXISTS {database} SYNC")
        phase = PHASES[trial % len(PHASES)]
        where = kill_at(world, scale.batch, target, phase)
        change_source_while_down(world, rng, trial)
        comparisons = world.rerun_and_compare()
        if trial == len(targets) - 1:
            comparisons += world.build_and_compare_models(dbt_dir)
        if not report.record(scenario, comparisons, time.monotonic() - started, faults=1):
            failures.append((where, comparisons))
    for where, comparisons in failures:
        print(f"trial {where}:")
        assert_all_ok(comparisons)


def test_loader_sigkilled_during_a_sync_then_rerun_is_exact(
    world: World, report: Report, tmp_path: Path
) -> None:
    run_sigkill_trials(world, report, FAST, "1 loader SIGKILL (fast)", tmp_path / "dbt")


@pytest.mark.slow
@pytest.mark.timeout(3_600)
def test_loader_sigkilled_at_24_points_of_a_large_sync_then_rerun_is_exact(
    world: World, report: Report, tmp_path: Path
) -> None:
    run_sigkill_trials(world, report, SLOW, "1 loader SIGKILL x24", tmp_path / "dbt")
