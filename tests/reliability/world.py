"""The world a reliability scenario acts on: the stack, both databases, and the loader and flow
as a scheduled run drives them; plus helpers to (re)start servers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
)
from pymongo import MongoClient

from devstack.process import PortBusyError
from devstack.stack import Stack
from loader.settings import Settings
from loader.synthetic import seed

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

    def load(self) -> None:
        """What a scheduled run does for the loader: sync both collections, reconcile deletes."""
        for collection in ("employee", "tasks"):
            self.sync(collection)
        self.reconcile("tasks")

    def reconcile(self, collection: str = "tasks") -> Any:
        from loader.reconcile import reconcile_collection

        return reconcile_collection(self.settings, collection)

    def spawn(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            env={**os.environ, **self.env, **(extra_env or {})},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
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
