"""The world a reliability scenario acts on: the stack, both databases, and the loader and flow
as a scheduled run drives them; plus helpers to (re)start servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import clickhouse_connect
from harness import (
    REPO,
    Comparison,
    Truth,
    compare_pipeline_state,
    compare_raw,
    compare_task_events,
    dbt_build,
    read_truth,
    reconcile_found_only_deletes,
    sync_alone,
)
from pymongo import MongoClient
from worker import PHASES  # noqa: F401 - the fault points, for the scenarios

from devstack.process import PortBusyError
from devstack.stack import Stack
from loader.settings import Settings
from synthetic import seed

RELIABILITY_DB = "reliability"
WORKER = Path(__file__).with_name("worker.py")


class World:
    """One stack, one MongoDB database, and the loader pointed at them."""

    def __init__(self, stack: Stack, data_dir: Path, mongo_db: str = RELIABILITY_DB) -> None:
        self.stack = stack
        self.data_dir = data_dir
        self.env = {**stack.env, "MONGO_DB": mongo_db, "PIPELINE_DATA_DIR": str(data_dir)}
        self.settings = Settings(
            mongo_uri=stack.mongo_uri,
            mongo_db=mongo_db,
            clickhouse_host=stack.clickhouse_host,
            clickhouse_port=stack.clickhouse_port,
            clickhouse_user=stack.clickhouse_user,
            clickhouse_password=stack.clickhouse_password or "",
            redis_url=stack.redis_url,
            retry_attempts=6,
            retry_initial_wait=0.2,
            retry_max_wait=3.0,
        )
        self.mongo: MongoClient = MongoClient(stack.mongo_uri, serverSelectionTimeoutMS=30_000)
        self.db = self.mongo[mongo_db]
        self.ch = self.connect_clickhouse()

    def connect_clickhouse(self) -> Any:
        return clickhouse_connect.get_client(
            host=self.stack.clickhouse_host,
            port=self.stack.clickhouse_port,
            username=self.stack.clickhouse_user,
            password=self.stack.clickhouse_password or "",
        )

    def reconnect_mongo(self) -> None:
        self.mongo.close()
        self.mongo = MongoClient(self.stack.mongo_uri, serverSelectionTimeoutMS=30_000)
        self.db = self.mongo[self.db.name]

    def reconnect_clickhouse(self) -> None:
        self.ch.close()
        self.ch = self.connect_clickhouse()

    def reset(self) -> None:
        """Empty warehouse, empty source database."""
        for database in ("raw", "ops", "analytics"):
            self.ch.command(f"DROP DATABASE IF EXISTS {database} SYNC")
        self.mongo.drop_database(self.db.name)

    def seed(self, n_tasks: int, seed_no: int = 11) -> None:
        seed(self.db, n_tasks, seed=seed_no, batch=5_000)

    def sync(self, collection: str = "tasks") -> Any:
        from loader.sync import sync_collection

        return sync_collection(self.settings, collection)

    def rerun_and_compare(self, collections: tuple[str, ...] = ("tasks",)) -> list[Comparison]:
        """The rerun after a fault, judged in two steps, so that reconcile is no safety net:
        right after the rerun syncs (both collections), `raw` must equal MongoDB but for deletes
        (polling cannot see them); reconcile must then find nothing missing or stale, only
        deletes to tombstone; after it, `raw` must equal MongoDB exactly."""
        for collection in ("employee", "tasks"):
            self.sync(collection)
        out = [sync_alone(compare_raw(self.ch, self.truth(c), c)) for c in collections]
        out.append(reconcile_found_only_deletes(self.reconcile("tasks")))
        return out + self.compare_raw(collections)

    def reconcile(self, collection: str = "tasks") -> Any:
        from loader.reconcile import reconcile_collection

        return reconcile_collection(self.settings, collection)

    def spawn(
        self,
        *args: str,
        extra_env: dict[str, str] | None = None,
        stdin: int | None = None,
        stderr: int | IO[Any] = subprocess.PIPE,
        script: Path = WORKER,
    ) -> subprocess.Popen[str]:
        # The repo first on the path: the worker runs this checkout's code, as the tests do.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            env={**os.environ, **self.env, "PYTHONPATH": path, **(extra_env or {})},
            cwd=REPO,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )

    def truth(self, collection: str = "tasks") -> Truth:
        return read_truth(self.db, collection, self.settings.max_string_chars)

    def compare_raw(self, collections: tuple[str, ...] = ("tasks",)) -> list[Comparison]:
        return [compare_raw(self.ch, self.truth(c), c) for c in collections]

    def build_and_compare_models(self, workdir: Path) -> list[Comparison]:
        dbt_build(self.env, workdir)
        truth = self.truth("tasks")
        return [compare_task_events(self.ch, truth), compare_pipeline_state(self.ch, truth)]

    def close(self) -> None:
        self.mongo.close()
        self.ch.close()


@contextmanager
def emptied_world(stack: Stack, data_dir: Path) -> Iterator[World]:
    """A `World` on `stack` with both databases emptied first, its clients closed after."""
    world = World(stack, data_dir)
    world.reset()
    try:
        yield world
    finally:
        world.close()


class LoaderProcess:
    """`worker.py sync` in a subprocess, paused at one of its fault points (`worker.py`): the
    parent reads its announcements, injects a fault while it waits, then resumes or kills it.
    Every method that waits for an announcement fails loudly when the loader finished or died
    without making it: a fault point that is never reached is a broken scenario, not a pass."""

    def __init__(
        self,
        world: World,
        batch_size: int,
        pause_at: tuple[str, int] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        args = ["sync", "--batch-size", str(batch_size)]
        if pause_at:
            args += ["--pause-at", f"{pause_at[0]}:{pause_at[1]}"]
        # stderr to a file: a chatty loader must never block on a full pipe.
        self.stderr_file = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by close()
        self.proc = world.spawn(
            *args, extra_env=extra_env, stdin=subprocess.PIPE, stderr=self.stderr_file
        )
        self.lines: list[str] = []
        self.result: dict[str, Any] | None = None

    def _next(self) -> str | None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return None
        line = line.strip()
        self.lines.append(line)
        if line.startswith("done "):
            self.result = json.loads(line[5:])
        return line

    def wait_for(self, announcement: str) -> None:
        """Read announcements until `announcement` (e.g. `insert 3`)."""
        while (line := self._next()) is not None:
            if line == announcement:
                return
        self.proc.wait(60)
        raise AssertionError(
            f"the loader never reached its fault point {announcement!r}: it exited with "
            f"{self.proc.returncode} after {self.lines[-3:]}; stderr: {self.stderr()[-600:]}"
        )

    def wait_for_retry(self) -> str:
        """Read announcements until the loader reports a transient error (it met the fault)."""
        while (line := self._next()) is not None:
            if line.startswith("retry "):
                return line
        self.proc.wait(60)
        raise AssertionError(
            f"the loader never met the fault: it exited with {self.proc.returncode} after "
            f"{self.lines[-3:]}; stderr: {self.stderr()[-600:]}"
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def resume(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> int:
        """SIGKILL; returns the exit status (-9 when the signal killed it)."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(60)

    def finish(self, timeout: float = 600) -> int:
        """Let it run to its end; returns the exit status."""
        while self._next() is not None:
            pass
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()
        self.stderr_file.close()


def port_refuses(host: str, port: int) -> bool:
    """True when nothing accepts connections on host:port (the server is down)."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except OSError:
        return True


def restart(stack: Stack, service: str, timeout: float = 120.0) -> None:
    """Start a killed server again; its port may stay busy a little while connections close."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stack.start(service)
            return
        except PortBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
