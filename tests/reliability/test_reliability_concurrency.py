"""Scenarios 4 and 6 (loader side): a writer process changing the source while syncs run back to
back, and two loaders on the same collection at once. After the writer stops, one more sync must
leave ClickHouse equal to MongoDB but for deletes (the overlap window covers every write made
under the syncs), a reconcile must then find only deletes, and after it ClickHouse must equal
MongoDB exactly. No reconcile runs while the writer writes: it would repair what the syncs miss
before anything is judged."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from harness import Report, assert_all_ok
from world import LoaderProcess, World

from loader.settings import Settings
from loader.sync import BatchStored, sync_collection
from loader.watermark import load_watermark
from synthetic import mutate


class Writer:
    """The writer subprocess: runs until its stop file appears."""

    def __init__(self, world: World, tmp_path: Path, seed: int) -> None:
        self.stop_file = tmp_path / f"stop-writer-{seed}"
        self.proc = world.spawn("write", "--stop-file", str(self.stop_file), "--seed", str(seed))

    def stop(self) -> str:
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=120)
        except BaseException:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            raise
        assert self.proc.returncode == 0, err
        return out.strip()


def writer_scenario(
    world: World, report: Report, tmp_path: Path, seconds: float, scenario: str
) -> None:
    world.seed(5_000)
    started = time.monotonic()
    writer = Writer(world, tmp_path, seed=3)
    syncs = 0
    try:
        while time.monotonic() - started < seconds:
            for collection in ("employee", "tasks"):
                world.sync(collection)
            syncs += 1
    finally:
        wrote = writer.stop()
    comparisons = world.rerun_and_compare(("tasks", "employee"))
    comparisons += world.build_and_compare_models(tmp_path / "dbt")
    print(f"{scenario}: {syncs} back-to-back syncs while the writer ran; writer: {wrote}")
    report.record(scenario, comparisons, time.monotonic() - started)
    assert "mutated" in wrote and syncs >= 2
    assert_all_ok(comparisons)


def test_writer_changing_the_source_during_back_to_back_syncs_then_exact(
    world: World, report: Report, tmp_path: Path
) -> None:
    writer_scenario(world, report, tmp_path, 12.0, "4 writer + back-to-back syncs (fast)")


@pytest.mark.slow
@pytest.mark.timeout(1_800)
def test_writer_for_three_minutes_during_back_to_back_syncs_then_exact(
    world: World, report: Report, tmp_path: Path
) -> None:
    writer_scenario(world, report, tmp_path, 180.0, "4 writer + back-to-back syncs 3 min")


def test_two_loader_processes_on_one_collection_while_a_writer_runs_then_exact(
    world: World, report: Report, tmp_path: Path
) -> None:
    world.seed(8_000)
    world.sync("employee")
    started = time.monotonic()
    writer = Writer(world, tmp_path, seed=4)
    # Both loaders pause once they have stored two batches, then go on together: they overlap
    # by construction, whatever the start-up times of the two processes.
    loaders = [LoaderProcess(world, 500, pause_at=("stored", 2)) for _ in range(2)]
    try:
        for loader in loaders:
            loader.wait_for("stored 2")
        assert all(loader.alive() for loader in loaders)
        for loader in loaders:
            loader.resume()
        statuses = [loader.finish() for loader in loaders]
    finally:
        wrote = writer.stop()
        for loader in loaders:
            loader.close()
    assert statuses == [0, 0], [loader.stderr()[-600:] for loader in loaders]
    assert [loader.result and loader.result["status"] for loader in loaders] == ["ok", "ok"]
    comparisons = world.rerun_and_compare(("tasks",))
    comparisons += world.build_and_compare_models(tmp_path / "dbt")
    print(f"two loaders at once; writer: {wrote}")
    report.record("6 two loaders + writer", comparisons, time.monotonic() - started, faults=1)
    assert_all_ok(comparisons)


def test_two_loaders_at_once_keep_the_newest_watermark(world: World) -> None:
    """Loader A has read everything and stored its last batch but not yet saved the watermark;
    the source changes and loader B syncs to a newer watermark; then A saves. The stored
    watermark must not go back to A's."""
    world.seed(2_000)
    settings: Settings = world.settings
    a_paused = threading.Event()
    b_done = threading.Event()
    results = {}

    def hold_last_batch(stored: BatchStored) -> None:
        # The partial batch is flushed after A's cursor is exhausted: A has read everything.
        if stored.rows + stored.rejects < 600:
            a_paused.set()
            assert b_done.wait(300)

    def loader_a() -> None:
        results["a"] = sync_collection(
            settings, "tasks", batch_size=600, after_insert=hold_last_batch
        )

    thread = threading.Thread(target=loader_a)
    thread.start()
    try:
        assert a_paused.wait(300)
        mutate(world.db, 30, seed=9)
        results["b"] = sync_collection(settings, "tasks", batch_size=600)
    finally:
        b_done.set()
        thread.join(300)

    stored = load_watermark(world.ch, "tasks")
    assert stored is not None
    newest = max(results["a"].watermark_after, results["b"].watermark_after)
    assert results["b"].watermark_after == newest
    assert stored.describe() == newest
