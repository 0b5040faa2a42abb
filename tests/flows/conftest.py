"""Fixtures of the flow suite: one Prefect test harness for the session, and a fresh pipeline
(empty warehouse, freshly seeded MongoDB, private Redis keys) for every test, on the real stack."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testkit import Captured, captured_run_logs

REPO = Path(__file__).resolve().parents[2]
N_TASKS = 300


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    # Slow to start (a server subprocess and a SQLite schema): once per session.
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def dbt_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A profiles.yml from the example (env vars point it at the test stack) and a private
    target dir, so tests never touch the repo's profiles.yml or target/."""
    base = tmp_path_factory.mktemp("dbt")
    shutil.copy(REPO / "profiles.yml.example", base / "profiles.yml")
    return {"profiles": base, "target": base / "target"}


class Pipeline:
    """Handles on the real servers behind one test's pipeline."""

    def __init__(self, stack: Any, settings: Any):
        import clickhouse_connect
        from pymongo import MongoClient

        from loader.settings import Settings

        self.stack = stack
        self.settings = settings
        self.loader_settings = Settings()
        self.mongo = MongoClient(self.loader_settings.mongo_uri)
        self.db = self.mongo[self.loader_settings.mongo_db]
        self.ch = clickhouse_connect.get_client(
            host=settings.clickhouse_host, port=settings.clickhouse_port
        )

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.ch.query(sql, parameters=params).result_rows[0][0]

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        result = self.ch.query(sql, parameters=params)
        return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]

    def close(self) -> None:
        self.mongo.close()
        self.ch.close()


@pytest.fixture
def pipeline(
    stack: Any,
    prefect_harness: None,
    dbt_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Pipeline]:
    from flows.settings import FlowSettings
    from synthetic import seed

    private = uuid.uuid4().hex[:8]
    monkeypatch.setenv("PIPELINE_DBT_PROFILES_DIR", str(dbt_dirs["profiles"]))
    monkeypatch.setenv("PIPELINE_DBT_TARGET_PATH", str(dbt_dirs["target"]))
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PIPELINE_REDIS_PREFIX", f"test-{private}")
    monkeypatch.setenv("PIPELINE_CONCURRENCY_LIMIT_NAME", f"sync-pipeline-{private}")
    monkeypatch.setenv("PIPELINE_TASK_RETRY_DELAY_SECONDS", "0.2")
    settings = FlowSettings()
    p = Pipeline(stack, settings)
    # The warehouse is shared by the whole session: start every test from an empty one.
    for database in ("raw", "ops", "analytics"):
        p.ch.command(f"DROP DATABASE IF EXISTS {database}")
    p.mongo.drop_database(p.loader_settings.mongo_db)
    seed(p.db, N_TASKS, seed=7)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def run_logs() -> Iterator[Captured]:
    """Every record of Prefect's run loggers during the test."""
    with captured_run_logs() as handler:
        yield handler
