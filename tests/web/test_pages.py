"""The dashboard's pages in a real browser, their numbers checked against ClickHouse and MongoDB.

One dataset for the module (seeded to end now, one real flow run); every test reads what the
page shows (tables, facts, lists) and compares it with a query of its own on the warehouse, and
where MongoDB can say it, with `tests/mongo_oracle.py`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mongo_oracle import OPEN_STATUSES, current_task_per_file, open_work
from playwright.sync_api import expect

if TYPE_CHECKING:
    from conftest import Site

pytestmark = pytest.mark.timeout(900)


def number(text: str) -> int:
    return int(re.sub(r"[^\d]", "", text))


def table_rows(page: Any, testid: str) -> list[list[str]]:
    return page.eval_on_selector_all(
        f"[data-testid={testid}] tbody tr",
        "rows => rows.map(r => Array.from(r.children).map(c => c.innerText.trim()))",
    )


def open_overview(page: Any, site: Site, query: str = "") -> None:
    page.goto(site.url + "/" + query)
    page.wait_for_selector("#chart-funnel .main-svg")  # plotly.js drew the funnel


def test_the_funnel_shows_files_per_stage_as_clickhouse_and_mongodb_count_them(
    page: Any, site: Site
) -> None:
    open_overview(page, site)

    shown = {
        r[0].split()[0]: (number(r[1]), number(r[2]), number(r[3]))
        for r in table_rows(page, "funnel-table")
    }
    warehouse = {
        r["stage"]: (r["open"], r["closed"], r["files"])
        for r in site.rows(
            "SELECT stage, countIf(status IN ('assigned', 'in_progress')) AS open, "
            "countIf(status NOT IN ('assigned', 'in_progress')) AS closed, count() AS files "
            "FROM analytics.pipeline_state GROUP BY stage"
        )
    }
    per_stage: Counter[tuple[str, bool]] = Counter()
    for stage, _code, status, _at, _id in current_task_per_file(site.db).values():
        per_stage[(stage, status in OPEN_STATUSES)] += 1
    mongo = {
        stage: (per_stage[(stage, True)], per_stage[(stage, False)], n)
        for stage, n in Counter(s for s, _ in per_stage.elements()).items()
    }
    assert shown == warehouse == mongo
    total = sum(v[2] for v in warehouse.values())
    assert number(page.get_by_test_id("total-files").inner_text()) == total
    assert number(page.get_by_test_id("open-files").inner_text()) == sum(
        v[0] for v in warehouse.values()
    )
    # The charts are drawn, each with a text alternative.
    for chart in ("funnel", "ageing", "backlog", "throughput", "steps", "dbt"):
        expect(page.locator(f"#chart-{chart}")).to_have_attribute("role", "img")
        expect(page.locator(f"#chart-{chart} .main-svg").first).to_be_visible()


def test_throughput_per_stage_matches_the_warehouse(page: Any, site: Site) -> None:
    open_overview(page, site)
    page.get_by_text("Throughput as a table").click()

    shown = {r[0]: number(r[2]) for r in table_rows(page, "throughput-table")}
    warehouse = {
        r["stage"]: r["done"]
        for r in site.rows(
            "SELECT stage, sum(tasks_done) AS done FROM analytics.mart_daily_throughput "
            "WHERE day > (SELECT max(day) FROM analytics.mart_daily_throughput) - 30 "
            "GROUP BY stage"
        )
    }
    assert shown == warehouse


def workload_page(site: Site, order: str, offset: int) -> list[tuple[str, int]]:
    rows = site.rows(
        "SELECT employee_code, toUInt64(open_tasks) AS n FROM analytics.mart_employee_workload "
        f"ORDER BY {order}, employee_code LIMIT 8 OFFSET {offset}"
    )
    return [(r["employee_code"], r["n"]) for r in rows]


def shown_workload(page: Any) -> list[tuple[str, int]]:
    return [(r[0], number(r[3])) for r in table_rows(page, "workload-table")]


def test_workload_lists_everyone_sorted_paged_and_by_keyboard(page: Any, site: Site) -> None:
    employees = site.scalar("SELECT count() FROM analytics.mart_employee_workload")
    assert employees == 20  # the seeded staff: every one is listed, 8 a page
    open_overview(page, site)

    assert shown_workload(page) == workload_page(site, "open_tasks DESC", 0)
    expect(page.get_by_test_id("workload-page")).to_have_text("Page 1 of 3")

    # Reverse the sort with the keyboard: focus the header link, press Enter.
    page.locator("[data-testid=workload-table] a[data-sort=open_tasks]").focus()
    page.keyboard.press("Enter")
    expect(page.locator("th[aria-sort=ascending] a[data-sort=open_tasks]")).to_be_visible()
    assert shown_workload(page) == workload_page(site, "open_tasks ASC", 0)

    page.get_by_role("link", name="Next →").click()
    expect(page.get_by_test_id("workload-page")).to_have_text("Page 2 of 3")
    assert shown_workload(page) == workload_page(site, "open_tasks ASC", 8)

    page.locator("a[data-sort=employee_code]").click()
    assert shown_workload(page) == workload_page(site, "employee_code ASC", 0)


def test_the_overloaded_threshold_is_a_setting_a_view_can_change(page: Any, site: Site) -> None:
    counts = [
        r["n"]
        for r in site.rows(
            "SELECT toUInt64(open_tasks) AS n FROM analytics.mart_employee_workload ORDER BY n"
        )
    ]
    threshold = counts[len(counts) // 2] + 1  # about half of them over it
    expected = sum(1 for n in counts if n >= threshold)
    assert 0 < expected < len(counts)
    open_overview(page, site)
    default = site.settings.web_overloaded_tasks
    summary = page.get_by_test_id("workload-summary")
    expect(summary).to_contain_text(
        f"{sum(1 for n in counts if n >= default)} of {len(counts)} employees overloaded"
    )

    page.fill("#overloaded", str(threshold))
    page.press("#overloaded", "Enter")
    expect(summary).to_contain_text(f"{expected} of {len(counts)} employees overloaded")
    assert page.get_by_test_id("overloaded-count").inner_text() == str(expected)

    page.locator("label.check input").check()  # only the overloaded ones
    page.get_by_role("button", name="Apply").click()
    flagged = table_rows(page, "workload-table")
    pages = page.get_by_test_id("workload-page")
    assert len(flagged) == min(expected, 8)
    assert pages.count() == 0 or pages.inner_text().endswith(f"of {-(-expected // 8)}")
    for row in flagged:  # a word and a sign, not only a colour
        assert number(row[3]) >= threshold and "▲ overloaded" in row[5]


def test_longest_waiting_runs_and_alerts(page: Any, site: Site) -> None:
    open_overview(page, site)

    shown = [r[0] for r in table_rows(page, "waiting-table")]
    oldest = [
        r["file_id"]
        for r in site.rows(
            "SELECT file_id FROM analytics.pipeline_state "
            "WHERE status IN ('assigned', 'in_progress') ORDER BY assigned_at, file_id LIMIT 15"
        )
    ]
    assert shown == oldest
    waits = [r[4] for r in table_rows(page, "waiting-table")]
    assert all(re.fullmatch(r"(\d+ d( \d+ h)?|\d+ h( \d+ min)?|\d+ min)", w) for w in waits), waits

    runs = table_rows(page, "runs-table")
    recorded = site.scalar("SELECT uniqExact(run_id) FROM ops.step_timings")
    assert len(runs) == recorded == 1
    assert "✓ ok" in runs[0][2]
    assert number(runs[0][3]) == site.scalar(
        "SELECT sum(rows) FROM ops.step_timings WHERE startsWith(step, 'load:')"
    )
    alerts = site.scalar("SELECT count() FROM ops.alerts")
    if alerts:
        assert page.locator("[data-testid=alerts] li").count() == min(alerts, 20)
    else:
        expect(page.locator("#alerts")).to_contain_text("No alerts raised.")


def test_search_finds_a_file_by_prefix_and_its_page_shows_state_and_history(
    page: Any, site: Site
) -> None:
    states = current_task_per_file(site.db)
    # A file that went through several stages, found by a prefix that matches a few files.
    tasks_per_file = Counter(d["file_id"] for d in site.db.tasks.find({}, {"file_id": 1}))
    target = max(sorted(states), key=lambda f: tasks_per_file[f])
    prefix = target[:-1]
    page.goto(site.url + "/")
    page.fill("#q", prefix)
    page.press("#q", "Enter")

    listed = page.eval_on_selector_all(
        "[data-testid=file-results] a", "links => links.map(a => a.innerText)"
    )
    matches = sorted(f for f in states if f.startswith(prefix))[:20]
    assert listed == matches and target in listed
    page.get_by_role("link", name=target, exact=True).click()
    expect(page.get_by_test_id("file-id")).to_have_text(target)

    stage, code, status, _assigned, _task = states[target]
    row = site.rows(
        "SELECT stage, status, employee_code, employee_name FROM analytics.pipeline_state "
        "WHERE file_id = {f:String}",
        f=target,
    )[0]
    assert (row["stage"], row["status"], row["employee_code"]) == (stage, status, code)
    facts = page.get_by_test_id("file-state")
    expect(facts.locator("[data-field=stage]")).to_have_text(stage)
    expect(facts.locator("[data-field=status]")).to_contain_text(status.replace("_", " "))
    expect(facts.locator("[data-field=assignee]")).to_contain_text(f"({code})")
    expect(facts.locator("[data-field=assignee]")).to_contain_text(row["employee_name"])

    history = page.eval_on_selector_all(
        "[data-testid=history] li", "items => items.map(li => li.dataset.task)"
    )
    in_mongo = [
        str(d["_id"])
        for d in site.db.tasks.find({"file_id": target}).sort([("assigned_at", 1), ("_id", 1)])
    ]
    assert history == in_mongo and len(history) >= 2
    expect(page.locator("[data-testid=history] li.current")).to_have_attribute(
        "data-task", states[target][4]
    )
    expect(page.locator("#chart-timeline .main-svg").first).to_be_visible()
    page.screenshot(path=str(screenshots() / "file-1440.png"), full_page=True)

    # The whole id goes straight to the file.
    page.fill("#q", target)
    page.press("#q", "Enter")
    expect(page.get_by_test_id("file-id")).to_have_text(target)


def test_an_employee_is_found_by_name_and_shows_open_work(page: Any, site: Site) -> None:
    busiest = site.rows(
        "SELECT employee_code, employee_name, toUInt64(open_tasks) AS n "
        "FROM analytics.mart_employee_workload ORDER BY n DESC, employee_code LIMIT 1"
    )[0]
    surname = busiest["employee_name"].split()[-1]
    page.goto(site.url + "/")
    page.fill("#q", surname.lower())
    page.press("#q", "Enter")
    if "/employees/" not in page.url:  # several people share it: pick from the results
        page.locator(
            f"[data-testid=employee-results] a[href$='/{busiest['employee_code']}']"
        ).click()

    facts = page.get_by_test_id("employee-facts")
    expect(facts.locator("[data-field=open_tasks]")).to_contain_text(f"{busiest['n']:,}")
    assert busiest["n"] == open_work(site.db)[busiest["employee_code"]]
    listed = page.eval_on_selector_all(
        "[data-testid=employee-open] tbody a", "links => links.map(a => a.innerText)"
    )
    oldest = [
        r["file_id"]
        for r in site.rows(
            "SELECT file_id FROM analytics.pipeline_state WHERE employee_code = {c:String} "
            "AND status IN ('assigned', 'in_progress') ORDER BY assigned_at, file_id LIMIT 25",
            c=busiest["employee_code"],
        )
    ]
    assert listed == oldest
    done = site.scalar(
        "SELECT count() FROM analytics.task_events WHERE employee_code = {c:String} "
        "AND is_deleted = 0 AND status = 'done' AND toDate(updated_at) > "
        "(SELECT max(day) FROM analytics.mart_daily_throughput) - 30",
        c=busiest["employee_code"],
    )
    assert number(facts.locator("[data-field=done]").inner_text().split("(")[0]) == done


def test_unknown_file_and_employee_say_so(browser: Any, site: Site) -> None:
    context = browser.new_context()  # not `page`: the 404s are expected here
    try:
        page = context.new_page()
        response = page.goto(site.url + "/files/NO-SUCH-FILE")
        assert response is not None and response.status == 404
        expect(page.get_by_test_id("not-found")).to_contain_text("No file")
        response = page.goto(site.url + "/employees/NOBODY")
        assert response is not None and response.status == 404
        expect(page.get_by_test_id("not-found")).to_contain_text("No employee")
    finally:
        context.close()


def test_keyboard_reaches_the_skip_link_and_the_search(page: Any, site: Site) -> None:
    open_overview(page, site)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"

    open_overview(page, site)  # focus back at the top of the document
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "q":
            break
    assert page.evaluate("document.activeElement.id") == "q"
    # Focus is visible (an outline), not only a colour change.
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"
    page.keyboard.type("E0000")
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("employee-results")).to_contain_text("E00001")


def screenshots() -> Path:
    path = Path(
        os.environ.get("WEB_SCREENSHOTS") or Path(tempfile.gettempdir()) / "web-screenshots"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_readable_at_1440_and_390_pixels(browser: Any, site: Site) -> None:
    for width, name in ((1440, "overview-1440.png"), (390, "overview-390.png")):
        context = browser.new_context(viewport={"width": width, "height": 900})
        try:
            pg = context.new_page()
            pg.goto(site.url + "/")
            pg.wait_for_selector("#chart-funnel .main-svg")
            pg.wait_for_selector("#live-status[data-state=live]")
            # No sideways scrolling of the page: wide tables scroll inside their own box.
            assert pg.evaluate("document.documentElement.scrollWidth") <= width
            if width == 390:
                box = pg.locator("#q").bounding_box()
                assert box is not None and box["width"] >= 150
            pg.screenshot(path=str(screenshots() / name), full_page=True)
        finally:
            context.close()
