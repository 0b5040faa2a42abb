"""Write → open dashboard page: how long a MongoDB write takes to show on a page left open.

Against a running service (`make serve`: the hot path, the web dashboard and its live updates),
in Chromium: for each probe one file's page is opened and left open, the status of the file's
current task is changed in MongoDB, and the page notes (a MutationObserver) when its "Status"
field shows the new value. The latency is that moment minus MongoDB's acknowledgement of the
write (one clock: the browser and this script run on one machine).

    python -m bench.page_update --probes 40

Not a `make bench` group: it measures the service as it runs (its follower, its
`PIPELINE_WEB_LIVE_MIN_INTERVAL_SECONDS`), not a stack the bench starts. It changes the status
of the probed files' current tasks.
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import UTC, datetime
from typing import Any

STATUSES = ("assigned", "in_progress", "done", "rejected")
# Records when the Status field first shows `want` (its words joined by "_", as stored).
OBSERVE = """(want) => {
    window.__seenAt = null;
    const shows = () => {
        const field = document.querySelector("[data-field=status]");
        return field && field.innerText.toLowerCase().split(/\\s+/).join("_").includes(want);
    };
    new MutationObserver(() => {
        if (window.__seenAt === null && shows()) window.__seenAt = Date.now();
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def shown_status(page: Any) -> str:
    return "_".join(page.inner_text("[data-field=status]").lower().split())


def probe(page: Any, tasks: Any, url: str, file_id: str, task_id: Any, timeout_s: float) -> float:
    """One status change on `file_id`'s open page; its latency in ms."""
    page.goto(f"{url}/files/{file_id}")
    page.wait_for_selector("#live-status[data-state=live]")  # the event stream is open
    new = next(s for s in STATUSES if s not in shown_status(page))
    page.evaluate(OBSERVE, new)
    tasks.update_one({"_id": task_id}, {"$set": {"status": new, "updated_at": datetime.now(UTC)}})
    acknowledged_ms = time.time() * 1000
    deadline = time.monotonic() + timeout_s
    while (seen := page.evaluate("() => window.__seenAt")) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page of {file_id} did not show {new} within {timeout_s} s")
        time.sleep(0.01)
    return float(seen) - acknowledged_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=40, help="status changes (default 40)")
    parser.add_argument(
        "--url", help="the web dashboard (default: PIPELINE_WEB_HOST and PIPELINE_WEB_PORT)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per probe")
    args = parser.parse_args()

    from bson import ObjectId
    from playwright.sync_api import sync_playwright

    from bench.report import percentile
    from loader.clients import connect_clickhouse, connect_mongo
    from loader.settings import Settings
    from web.browser import launch
    from web.settings import WebSettings

    settings = Settings()
    url = args.url or WebSettings().url
    mongo = connect_mongo(settings)
    ch = connect_clickhouse(settings)
    files = ch.query(
        "SELECT file_id, task_id FROM analytics.pipeline_state "
        "ORDER BY cityHash64(file_id) LIMIT {n:UInt32}",
        parameters={"n": args.probes},
    ).result_rows
    tasks = mongo[settings.mongo_db].tasks
    rng = random.Random(1)
    latencies: list[float] = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page()
        for file_id, task_id in files:
            time.sleep(rng.uniform(0.2, 0.6))  # writes fall anywhere in the live interval
            latencies.append(probe(page, tasks, url, file_id, ObjectId(task_id), args.timeout))
        browser.close()
    print(
        f"write → open page, {len(latencies)} probes: p50 {percentile(latencies, 50):.0f} ms, "
        f"p90 {percentile(latencies, 90):.0f} ms, max {max(latencies):.0f} ms"
    )


if __name__ == "__main__":
    main()
