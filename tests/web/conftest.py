"""Fixtures of the browser tests: a synced pipeline on the test stack, the dashboard served from
this process on a free port, and Debian's chromium driven by Playwright.

Each test module gets its own dataset (seeded to end now, so waits read in hours and days) and
one real flow run; the tests read the pages in a real browser and compare what they show with
ClickHouse and with MongoDB (`tests/mongo_oracle.py`). Screenshots go to
`$TMPDIR/web-screenshots/` (`WEB_SCREENSHOTS` overrides) for a person to look at.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
N_TASKS = 1500  # 20 employees, about 600 files: a few pages of workload at 8 rows a page

# The flow suite's session fixtures (one Prefect harness, a private dbt target) and its Pipeline
# handle, loaded from its conftest rather than copied.
_spec = importlib.util.spec_from_file_location(
    "flows_suite_conftest", HERE.parent / "flows" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_flows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_flows)
prefect_harness = _flows.prefect_harness
dbt_dirs = _flows.dbt_dirs
Pipeline = _flows.Pipeline


class Site:
    """The served dashboard and the real servers behind it."""

    def __init__(self, pipeline: Any, url: str, settings: Any):
        self.pipeline = pipeline
        self.url = url
        self.settings = settings
        self.ch = pipeline.ch
        self.db = pipeline.db

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        return self.pipeline.rows(sql, **params)

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.pipeline.scalar(sql, **params)


@pytest.fixture(scope="module")
def site(
    stack: Any, prefect_harness: None, dbt_dirs: dict[str, Path], tmp_path_factory: Any
) -> Iterator[Site]:
    from devstack.process import free_ports
    from flows.pipeline import sync_pipeline
    from synthetic import seed
    from web.server import BackgroundServer
    from web.settings import WebSettings

    private = uuid.uuid4().hex[:8]
    data = tmp_path_factory.mktemp("web")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_DBT_PROFILES_DIR", str(dbt_dirs["profiles"]))
        mp.setenv("PIPELINE_DBT_TARGET_PATH", str(dbt_dirs["target"]))
        mp.setenv("PIPELINE_DATA_DIR", str(data))
        mp.setenv("PIPELINE_REDIS_PREFIX", f"test-{private}")
        mp.setenv("PIPELINE_CONCURRENCY_LIMIT_NAME", f"sync-pipeline-{private}")
        mp.setenv("PIPELINE_TASK_RETRY_DELAY_SECONDS", "0.2")
        mp.setenv("PIPELINE_WEB_PAGE_SIZE", "8")
        mp.setenv("PIPELINE_WEB_PORT", str(free_ports(1)[0]))
        mp.delenv("PIPELINE_WEB_TOKEN", raising=False)
        settings = WebSettings()
        p = Pipeline(stack, settings)
        for database in ("raw", "ops", "analytics"):
            p.ch.command(f"DROP DATABASE IF EXISTS {database}")
        p.mongo.drop_database(p.loader_settings.mongo_db)
        seed(p.db, N_TASKS, seed=11, end=datetime.now(UTC))
        summary = sync_pipeline()
        assert summary["status"] == "ok", summary
        server = BackgroundServer(settings).start()
        try:
            yield Site(p, server.url, settings)
        finally:
            server.stop()
            p.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    from web.browser import chromium_path, launch

    if chromium_path() is None and os.environ.get("CI") != "true":
        pytest.skip("no chromium: `apt-get install chromium` (CI installs it in .ci/run)")
    with sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


class PageErrors(list[str]):
    pass


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A 1440 x 900 page; a JavaScript error on it fails the test."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(20_000)
    pg = context.new_page()
    errors = PageErrors()
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on(
        "console",
        lambda msg: errors.append(msg.text) if msg.type == "error" else None,
    )
    try:
        yield pg
        assert not errors, f"errors in the page: {errors}"
    finally:
        context.close()
