"""The hot path under faults: the change-stream follower loses and duplicates nothing.

The follower runs as a process of its own (`follower_worker.py`) on a built warehouse (the
materialized views carry raw.tasks into `pipeline_state_store`), while a writer process changes
MongoDB. Each scenario injects one fault and checks that it landed:
- the follower SIGKILLed between storing a batch in raw and saving its resume token, then
  started again;
- the ClickHouse server killed and started again on the same data dir (a new pid) while the
  follower runs: the follower meets it, retries, and goes on;
- mongod the same;
- a burst of writes (inserts, updates, reassignments, deletes; 10,000 by default, 50,000 with
  RUN_SLOW=1) while the follower runs: stored in several batches of at most 1,000 documents,
  the lag recorded in `ops.change_stream_state` while it catches up and back at zero after.
Once the writes stop and the follower has caught up, `raw.tasks` (FINAL and by argMax without
FINAL) and `analytics.pipeline_state` must equal MongoDB exactly, without any dbt run; then a
`dbt build` (its full-recomputation tests included) must agree. Servers come from a private
stack (`fault_stack`), so the session's are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Comparison,
    Report,
    assert_all_ok,
    compare_pipeline_state,
    compare_raw,
    dbt_build,
)
from world import LoaderProcess, World, port_refuses, restart

from synthetic import mutate

FOLLOWER = Path(__file__).with_name("follower_worker.py")
TASKS = 3_000
# Retry long enough to outlast a server restart, quickly enough to notice it soon after.
FOLLOWER_ENV = {
    "LOADER_RETRY_ATTEMPTS": "20",
    "LOADER_RETRY_INITIAL_WAIT": "0.2",
    "LOADER_RETRY_MAX_WAIT": "1",
    "LOADER_CONNECT_TIMEOUT": "2",
}
CATCH_UP_S = 120  # how long to wait for the follower to reach MongoDB after the writes stop
BATCH_MAX = 1_000  # LOADER's flush_every: documents per batch at most
BURST = 50_000 if os.environ.get("RUN_SLOW") == "1" else 10_000


class FollowerProcess(LoaderProcess):
    """`follower_worker.py` in a subprocess, driven like the loader's (`LoaderProcess`: its
    announcements read line by line, killed or closed the same way)."""

    def __init__(self, world: World, pause_at_stored: int | None = None) -> None:
        args = [] if pause_at_stored is None else ["--pause-at-stored", str(pause_at_stored)]
        self.stderr_file = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by close()
        self.proc = world.spawn(
            *args,
            extra_env=FOLLOWER_ENV,
            stdin=subprocess.PIPE,
            stderr=self.stderr_file,
            script=FOLLOWER,
        )
        self.lines: list[str] = []
        self.result: dict[str, Any] | None = None
        # Read in a thread of its own: a follower that announces while nobody waits for it
        # must never block on a full pipe.
        self._announced: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed by close()
            for line in self.proc.stdout:
                self._announced.put(line.strip())
        self._announced.put(None)

    def _next(self) -> str | None:
        if self._ended:
            return None
        line = self._announced.get()
        if line is None:
            self._ended = True
            return None
        self.lines.append(line)
        return line

    @property
    def settled(self) -> list[dict[str, Any]]:
        """Every batch announced as settled so far."""
        while not self._ended and not self._announced.empty():
            self._next()
        return [json.loads(x[8:]) for x in self.lines if x.startswith("settled ")]

    def wait_for_next(self, wanted: str) -> str:
        """Read announcements until one starts with `wanted`; returns it. Fails loudly when
        the follower exited without making it."""
        while (line := self._next()) is not None:
            if line.startswith(wanted):
                return line
        self.proc.wait(60)
        raise AssertionError(
            f"the follower never announced {wanted!r}: it exited with {self.proc.returncode} "
            f"after {self.lines[-3:]}; stderr: {self.stderr()[-800:]}"
        )

    def drain(self) -> None:
        """Read what a dead follower announced before it died."""
        while self._next() is not None:
            pass

    def stop(self) -> dict[str, Any]:
        """SIGTERM: the follower stores what it holds, saves its position and exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        done = self.wait_for_next("done ")
        assert self.proc.wait(60) == 0, self.stderr()[-800:]
        return dict(json.loads(done[5:]))


class Writer:
    """`worker.py write` in a subprocess: updates, inserts and deletes until stopped."""

    def __init__(self, world: World, tmp_path: Path, seed: int) -> None:
        self.stop_file = tmp_path / f"stop-writer-{seed}"
        self.proc = world.spawn("write", "--stop-file", str(self.stop_file), "--seed", str(seed))

    def stop(self) -> dict[str, int]:
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err[-800:]
        wrote = next(x for x in out.splitlines() if x.startswith("wrote "))
        return dict(json.loads(wrote[6:]))


@pytest.fixture
def hot(fault_world: World, tmp_path: Path) -> World:
    """A built warehouse (views on raw.tasks feed pipeline_state_store) whose follower position
    is saved: the follower processes resume from there, so no write is missed."""
    from loader.follower import follow_changes

    fault_world.seed(TASKS)
    fault_world.sync("employee")
    fault_world.sync("tasks")
    dbt_build(fault_world.env, tmp_path / "dbt")
    follow_changes(fault_world.settings, "tasks", all_changes=True, max_events=0)
    return fault_world


def live_counts(world: World) -> tuple[int, int]:
    """Live tasks in raw: deduplicated by FINAL, and by argMax without FINAL."""
    final = world.ch.command("SELECT count() FROM raw.tasks FINAL WHERE is_deleted = 0")
    by_argmax = world.ch.command(
        "SELECT count() FROM (SELECT _id FROM raw.tasks GROUP BY _id "
        "HAVING argMax(is_deleted, (_version, _loaded_at)) = 0)"
    )
    return int(final), int(by_argmax)


def hot_path_comparisons(world: World) -> list[Comparison]:
    truth = world.truth("tasks")
    final, by_argmax = live_counts(world)
    counts = Comparison("live tasks in raw (FINAL, argMax) vs MongoDB", checked=len(truth.rows))
    if not final == by_argmax == len(truth.rows):
        counts.mismatched = 1
        counts.note(f"MongoDB {len(truth.rows)}, FINAL {final}, argMax {by_argmax}")
    return [compare_raw(world.ch, truth, "tasks"), compare_pipeline_state(world.ch, truth), counts]


def caught_up(world: World, follower: FollowerProcess, lags: list[float]) -> list[Comparison]:
    """Wait until the follower has brought raw and pipeline_state to MongoDB (the writes have
    stopped), noting the lag it saves meanwhile; returns the last comparisons."""
    deadline = time.monotonic() + CATCH_UP_S
    while True:
        assert follower.alive(), f"the follower died: {follower.stderr()[-800:]}"
        lags.append(saved_lag(world))
        comparisons = hot_path_comparisons(world)
        if all(c.ok for c in comparisons) or time.monotonic() > deadline:
            return comparisons
        time.sleep(1.0)


def saved_lag(world: World) -> float:
    rows = world.ch.query(
        "SELECT lag_seconds FROM ops.change_stream_state FINAL WHERE collection = 'tasks'"
    ).result_rows
    return float(rows[0][0]) if rows else 0.0


def finish(
    world: World, report: Report, scenario: str, follower: FollowerProcess, started: float
) -> None:
    """The follower caught up: raw and pipeline_state equal MongoDB without any dbt run
    (nothing lost, nothing duplicated); it stopped cleanly; a build then agrees."""
    comparisons = caught_up(world, follower, [])
    follower.stop()
    report.record(scenario, comparisons, time.monotonic() - started, faults=1)
    assert_all_ok(comparisons)
    dbt_build(world.env, world.data_dir / "dbt-after")
    assert_all_ok(hot_path_comparisons(world))


def server_pid(world: World, service: str) -> int:
    pid = world.stack.service(service).status().pid
    assert pid is not None, f"{service} is not running"
    return pid


def test_follower_sigkilled_between_storing_a_batch_and_saving_its_position_loses_nothing(
    hot: World, report: Report, tmp_path: Path
) -> None:
    started = time.monotonic()
    writer = Writer(hot, tmp_path, seed=21)
    follower = FollowerProcess(hot, pause_at_stored=3)
    try:
        follower.wait_for_next("stored 3")
        assert follower.alive(), "the follower exited at its fault point instead of pausing"
        assert follower.kill() == -signal.SIGKILL
        follower.drain()
        # Mid-batch: batch 3 is in raw but was never settled, so its position was never saved.
        assert len(follower.settled) < 3, follower.lines
        follower.close()
        follower = FollowerProcess(hot)
        follower.wait_for_next("settled ")  # the restarted follower stores the writer's changes
        writer.stop()
        finish(hot, report, "F1 follower SIGKILL mid-batch", follower, started)
    finally:
        follower.close()
        writer.stop_file.touch()


def restart_under_follower(
    world: World, report: Report, tmp_path: Path, service: str, scenario: str
) -> None:
    """Kill `service` while the follower stores a writer's changes, check the follower met it,
    start the server again on its data dir (a new pid), and check the follower goes on."""
    started = time.monotonic()
    host = world.stack.clickhouse_host if service == "clickhouse" else "127.0.0.1"
    port = world.stack.clickhouse_port if service == "clickhouse" else world.stack.mongo_port
    follower = FollowerProcess(world)
    writer = Writer(world, tmp_path, seed=22)
    try:
        follower.wait_for_next("settled ")  # the follower is storing batches
        before = server_pid(world, service)
        if service == "mongo":
            writer.stop()  # its connection dies with mongod; a new writer follows
            world.mongo.close()  # our pooled sockets would keep the port busy
        world.stack.kill(service)
        assert port_refuses(host, port), f"{service} still accepts connections"
        follower.wait_for_next("retry ")  # it met the dead server
        restart(world.stack, service)
        assert server_pid(world, service) != before
        world.reconnect_clickhouse()
        world.reconnect_mongo()
        if service == "mongo":
            writer = Writer(world, tmp_path, seed=23)
        seen = len(follower.settled)
        follower.wait_for_next("settled ")  # it goes on storing after the restart
        assert len(follower.settled) > seen and follower.alive()
        writer.stop()
        finish(world, report, scenario, follower, started)
    finally:
        follower.close()
        writer.stop_file.touch()
        if port_refuses(host, port):  # a failed trial leaves the next ones a running server
            restart(world.stack, service)


def test_follower_retries_through_a_clickhouse_restart_and_loses_nothing(
    hot: World, report: Report, tmp_path: Path
) -> None:
    restart_under_follower(hot, report, tmp_path, "clickhouse", "F2 ClickHouse restart")


def test_follower_retries_through_a_mongod_restart_and_loses_nothing(
    hot: World, report: Report, tmp_path: Path
) -> None:
    restart_under_follower(hot, report, tmp_path, "mongo", "F3 mongod restart")


def burst(world: World, n: int) -> int:
    """About `n` writes at once, the way the real system makes them (`synthetic.mutate`: status
    changes, reassignments, a new task when a stage is done) and deletes of a twentieth as many
    tasks; returns the writes made."""
    written, seed = 0, 400
    while written < n - n // 20:
        result = mutate(world.db, n - n // 20 - written, seed=seed)
        written += result.updated + result.inserted
        seed += 1
    victims = [d["_id"] for d in world.db.tasks.aggregate([{"$sample": {"size": n // 20}}])]
    return written + world.db.tasks.delete_many({"_id": {"$in": victims}}).deleted_count


def test_a_burst_while_the_follower_runs_arrives_in_batches_and_converges(
    hot: World, report: Report, tmp_path: Path
) -> None:
    started = time.monotonic()
    follower = FollowerProcess(hot)
    try:
        follower.wait_for_next("ready")
        written = burst(hot, BURST)
        print(f"burst: {written} writes")
        lags: list[float] = []
        comparisons = caught_up(hot, follower, lags)
        assert_all_ok(comparisons)
        batches = follower.settled
        print(f"burst: {len(batches)} batches, largest lag saved {max(lags):.1f} s")
        assert len(batches) > 1, "a burst is stored in several batches"
        assert max(b["rows"] + b["deletes"] for b in batches) <= BATCH_MAX
        assert max(lags) > 0, "the lag was never recorded while the follower caught up"
        # Idle once caught up: its next save says it is no longer behind.
        deadline = time.monotonic() + 30
        while saved_lag(hot) != 0.0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert saved_lag(hot) == 0.0
        follower.stop()
        report.record(
            f"F4 burst of {BURST:,} writes", comparisons, time.monotonic() - started, faults=1
        )
        dbt_build(hot.env, tmp_path / "dbt-after")
        assert_all_ok(hot_path_comparisons(hot))
    finally:
        follower.close()
