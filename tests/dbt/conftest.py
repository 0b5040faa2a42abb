"""Fixtures of the dbt suite: the repo's dbt project run in-process against the test stack.

dbt writes its artifacts and logs into a private temp dir and reads a profiles.yml copied from
`profiles.yml.example` (whose env vars the `stack` fixture points at the test servers), so the
suite never touches the repo's `target/`, `logs/` or `profiles.yml`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from pymongo import MongoClient
from pymongo.database import Database

REPO = Path(__file__).resolve().parents[2]
N_TASKS = 300
# A fixed clock for the synthetic data, so every run of the suite sees the same dataset.
DATA_END = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class DbtResult:
    """One dbt invocation: overall success, per-node statuses, and every log line it printed."""

    success: bool
    statuses: dict[str, str]
    messages: dict[str, str]
    log: list[str] = field(default_factory=list)
    exception: BaseException | None = None

    def failed(self) -> dict[str, str]:
        # "no-op": an exposure (models/exposures.yml), which a build lists but never runs
        return {
            name: s for name, s in self.statuses.items() if s not in ("success", "pass", "no-op")
        }


@dataclass
class DbtProject:
    """The repo's dbt project with private profiles, target and log dirs."""

    profiles_dir: Path
    target_path: Path
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        # For tools that read dbt's settings from the environment (sqlfluff's dbt templater).
        return {
            "DBT_PROFILES_DIR": str(self.profiles_dir),
            "DBT_TARGET_PATH": str(self.target_path),
            "DBT_LOG_PATH": str(self.log_path),
        }

    def invoke(self, *args: str, dbt_vars: dict[str, Any] | None = None) -> DbtResult:
        """`dbt <args>`; `dbt_vars` adds to the suite's vars (e.g. `as_of`, a frozen clock)."""
        import json

        from dbt.cli.main import dbtRunner

        from flows.dbt_build import forget_ensured_databases

        forget_ensured_databases()  # an earlier test's stack had the database; this one may not
        log: list[str] = []
        runner = dbtRunner(callbacks=[lambda event: log.append(event.info.msg)])
        res = runner.invoke(
            [
                *args,
                # The suite runs every test, the full recomputations included (dbt_project.yml).
                "--vars",
                json.dumps({"full_recompute_tests": True, **(dbt_vars or {})}),
                "--project-dir",
                str(REPO),
                "--profiles-dir",
                str(self.profiles_dir),
                "--target-path",
                str(self.target_path),
                "--log-path",
                str(self.log_path),
            ]
        )
        statuses: dict[str, str] = {}
        messages: dict[str, str] = {}
        results = getattr(res.result, "results", None) or []
        for r in results:
            statuses[r.node.name] = str(r.status)
            messages[r.node.name] = r.message or ""
        return DbtResult(bool(res.success), statuses, messages, log, res.exception)

    def ok(self, *args: str, dbt_vars: dict[str, Any] | None = None) -> DbtResult:
        """Invoke and fail the calling test with dbt's own words when anything went wrong."""
        result = self.invoke(*args, dbt_vars=dbt_vars)
        if not result.success:
            detail = "\n".join(
                f"  {n}: {s} {result.messages.get(n, '')}" for n, s in result.failed().items()
            )
            tail = "\n".join(result.log[-25:])
            pytest.fail(
                f"dbt {' '.join(args)} failed ({result.exception or 'see nodes'}):\n"
                f"{detail}\n{tail}"
            )
        return result


@pytest.fixture(scope="session")
def dbt(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> DbtProject:
    base = tmp_path_factory.mktemp("dbt_project")
    shutil.copy(REPO / "profiles.yml.example", base / "profiles.yml")
    return DbtProject(base, base / "target", base / "logs")


class Warehouse:
    """The synthetic source in MongoDB, the loader, and queries on ClickHouse, for one test."""

    def __init__(self, db: Database, ch: Any):
        from loader.settings import Settings

        self.db = db
        self.ch = ch
        self.settings = Settings()

    def seed(self, n_tasks: int = N_TASKS) -> None:
        from synthetic import seed

        seed(self.db, n_tasks, seed=7, end=DATA_END, days=60)

    def load(self, *, full_refresh: bool = False, deletes: bool = False) -> None:
        """Bring raw.* up to date with MongoDB through the loader (and its delete
        reconciliation, which writes tombstones for documents gone from MongoDB)."""
        from loader.sync import sync_collection

        for collection in ("employee", "tasks"):
            sync_collection(self.settings, collection, full_refresh=full_refresh)
        if deletes:
            from loader.reconcile import reconcile_collection

            reconcile_collection(self.settings, "tasks")

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.ch.query(sql, parameters=params).result_rows]

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.rows(sql, **params)[0][0]


@pytest.fixture
def warehouse(stack: Any) -> Iterator[Warehouse]:
    from loader.settings import Settings

    settings = Settings()  # reads the env vars the stack fixture exported
    mongo: MongoClient = MongoClient(settings.mongo_uri)
    ch = clickhouse_connect.get_client(
        host=stack.clickhouse_host,
        port=stack.clickhouse_port,
        username=stack.clickhouse_user,
        password=stack.clickhouse_password or "",
    )
    try:
        yield Warehouse(mongo[settings.mongo_db], ch)
    finally:
        ch.close()
        mongo.close()


@pytest.fixture
def built(warehouse: Warehouse, dbt: DbtProject) -> Warehouse:
    """A freshly seeded source, fully loaded, and every model rebuilt from scratch."""
    warehouse.seed()
    warehouse.load(full_refresh=True)
    dbt.ok("run", "--full-refresh")
    return warehouse
