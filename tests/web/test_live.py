"""Open pages follow the data by themselves: a change made in MongoDB shows after a sync without a
reload, and the trust banner turns to a warning when a run fails or the warehouse differs from
MongoDB, and back when a run repairs it. Server-sent events, driven by the versions the flow
bumps; the browser never reloads (a marker set in the page survives)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from bson import ObjectId
from mongo_oracle import current_task_per_file
from playwright.sync_api import expect

from flows.pipeline import sync_pipeline
from synthetic import STAGES

if TYPE_CHECKING:
    from conftest import Site

pytestmark = pytest.mark.timeout(900)
LIVE = 30_000  # ms a page may take to show a change: a wait, not a measured target


def watch(page: Any, site: Site, path: str) -> None:
    page.goto(site.url + path)
    page.wait_for_selector("#live-status[data-state=live]")  # the event stream is open
    page.evaluate("window.__notReloaded = true")


def not_reloaded(page: Any) -> bool:
    return page.evaluate("window.__notReloaded === true")


def test_a_change_in_mongodb_shows_on_open_pages_after_a_sync_without_reload(
    browser: Any, site: Site
) -> None:
    states = current_task_per_file(site.db)
    file_id, (stage, code, _status, _at, task_id) = next(
        (f, s)
        for f, s in sorted(states.items())
        if s[2] in ("assigned", "in_progress") and s[0] != STAGES[-1]
    )
    next_stage = STAGES[STAGES.index(stage) + 1]
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    try:
        file_page = context.new_page()
        overview = context.new_page()
        watch(file_page, site, f"/files/{file_id}")
        watch(overview, site, "/")
        history = file_page.locator("[data-testid=history] li")
        before = history.count()

        # The operations tool closes the task and assigns the file's next stage.
        now = datetime.now(UTC)
        site.db.tasks.update_one(
            {"_id": ObjectId(task_id)}, {"$set": {"status": "done", "updated_at": now}}
        )
        site.db.tasks.insert_one(
            {
                "file_id": file_id,
                "stage": next_stage,
                "employee_code": code,
                "employee_name": site.db.employee.find_one({"employee_code": code})[
                    "employee_name"
                ],
                "status": "assigned",
                "assigned_at": now,
                "updated_at": now,
            }
        )
        assert sync_pipeline()["status"] == "ok"

        stage_field = file_page.locator("[data-testid=file-state] [data-field=stage]")
        try:
            expect(stage_field).to_have_text(next_stage, timeout=LIVE)
            expect(history).to_have_count(before + 1, timeout=LIVE)
        except AssertionError:
            print("the page shows:", file_page.inner_text("#live")[:3000])
            raise
        assert not_reloaded(file_page)

        files_in_next = site.scalar(
            "SELECT count() FROM analytics.pipeline_state WHERE stage = {s:String}", s=next_stage
        )
        total = overview.locator(f"[data-testid=funnel-table] tr[data-stage={next_stage}] td")
        expect(total.last).to_have_text(f"{files_in_next:,}", timeout=LIVE)
        assert not_reloaded(overview)
    finally:
        context.close()


def test_a_failed_run_turns_the_banner_to_an_error_and_a_good_run_back(
    page: Any, site: Site, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch(page, site, "/")
    banner = page.locator("#trust")
    expect(banner).to_have_class(re.compile(r"\bbanner-ok\b"))

    site.db.tasks.update_one({}, {"$set": {"updated_at": datetime.now(UTC)}})  # needs a build
    with monkeypatch.context() as mp:
        mp.setenv("PIPELINE_DBT_PROFILES_DIR", str(tmp_path / "no-profiles-here"))
        mp.setenv("PIPELINE_TASK_RETRIES", "0")
        with pytest.raises(Exception, match="(?i)profile|dbt"):
            sync_pipeline()

    expect(banner).to_have_class(re.compile(r"\bbanner-error\b"), timeout=LIVE)
    expect(banner).to_contain_text("✕ Failed")
    expect(banner).to_contain_text("The last run failed")
    expect(page.locator("[data-testid=runs-table] tbody tr").first).to_contain_text("failed")
    assert not_reloaded(page)

    assert sync_pipeline()["status"] == "ok"
    expect(banner).to_have_class(re.compile(r"\bbanner-ok\b"), timeout=LIVE)
    expect(banner).to_contain_text("In step with MongoDB")
    assert not_reloaded(page)


def test_documents_that_differ_from_mongodb_are_on_the_banner_until_repaired(
    page: Any, site: Site
) -> None:
    from flows.cache import QueryCache
    from flows.redis_link import RedisLink
    from loader.clients import open_clients
    from loader.drift import measure_drift, record_drift
    from loader.settings import Settings

    watch(page, site, "/")
    banner = page.locator("#trust")
    doomed = [d["_id"] for d in site.db.tasks.find({}, {"_id": 1}).sort("_id", 1).limit(3)]
    site.db.tasks.delete_many({"_id": {"$in": doomed}})
    # A drift check as every flow run records it, then the end-of-run signal.
    with open_clients(Settings()) as clients:
        drift = measure_drift(clients, "tasks")
        assert drift.differ == 3
        record_drift(clients, drift, "drift-check-in-test")
    import logging

    link = RedisLink(site.settings, logging.getLogger("test"))
    QueryCache(site.settings, link).bump_runs()
    link.close()

    expect(banner).to_have_class(re.compile(r"\bbanner-warn\b"), timeout=LIVE)
    expect(banner).to_contain_text("3 documents differ from MongoDB")
    expect(banner).to_contain_text("! Warning")

    assert sync_pipeline()["status"] == "ok"  # counts differ: the run reconciles them
    expect(banner).to_have_class(re.compile(r"\bbanner-ok\b"), timeout=LIVE)
    expect(banner).to_contain_text("In step with MongoDB")
    assert not_reloaded(page)


def test_old_data_is_flagged_past_the_sync_threshold(site: Site) -> None:
    import logging

    from flows.redis_link import WEB_WITHOUT_REDIS, RetryingRedisLink
    from web.data import Reader, ReadStats
    from web.settings import WebSettings
    from web.views import now_ms, trust

    strict = WebSettings(web_stale_minutes=0.0001)  # 6 ms: every sync is older than that
    link = RetryingRedisLink(strict, logging.getLogger("test"), without=WEB_WITHOUT_REDIS)
    try:
        reader = Reader(strict, link, site.ch)
        fresh = trust(reader, site.settings, ReadStats(), now_ms())
        old = trust(reader, strict, ReadStats(), now_ms() + 1000)
    finally:
        link.close()
    assert fresh.level == "ok", fresh
    assert old.level == "warn"
    assert any("No successful sync for" in line for line in old.details), old.details
