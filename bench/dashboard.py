"""The dashboard's page load, three ways, for the latency comparison.

- `state`: the product's panels (`flows.dashboard.PANELS`) that read `analytics.pipeline_state`
  and the marts, straight from ClickHouse (no cache);
- `naive`: the same three panels computed the seed's way, from the naive
  `argMax(..., assigned_at) ... GROUP BY file_id` over every event (`analytics.task_events`) on
  every page load;
- `cached`: the product's panels through the Redis query cache (`flows.cache.QueryCache`),
  after one page load has filled it.
The run-history panel is left out of all three: it reads `ops`, not the pipeline's state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

OPEN = "('assigned', 'in_progress')"
NAIVE_STATE = """
    SELECT file_id,
           argMax(stage, assigned_at) AS current_stage,
           argMax(employee_code, assigned_at) AS employee_code,
           argMax(employee_name, assigned_at) AS employee_name,
           argMax(status, assigned_at) AS current_status,
           max(assigned_at) AS current_assigned_at
    FROM analytics.task_events
    WHERE is_deleted = 0
    GROUP BY file_id
"""
NAIVE_PANELS: tuple[tuple[str, str], ...] = (
    (
        "files_by_stage_status",
        f"""SELECT current_stage AS stage, current_status AS status, count() AS files,
                   round(max(dateDiff('second', current_assigned_at, now64(3))) / 3600, 1)
                       AS max_hours_in_stage
            FROM ({NAIVE_STATE}) GROUP BY stage, status ORDER BY stage, status""",
    ),
    (
        "longest_waiting",
        f"""SELECT file_id, current_stage AS stage, current_status AS status, employee_name,
                   current_assigned_at AS assigned_at,
                   round(dateDiff('second', current_assigned_at, now64(3)) / 3600, 1)
                       AS hours_in_stage
            FROM ({NAIVE_STATE}) WHERE current_status IN {OPEN}
            ORDER BY hours_in_stage DESC, file_id LIMIT 10""",
    ),
    (
        "employee_workload",
        f"""SELECT employee_code, any(employee_name) AS employee_name, count() AS open_tasks,
                   round(max(dateDiff('second', current_assigned_at, now64(3))) / 3600, 1)
                       AS oldest_open_hours
            FROM ({NAIVE_STATE}) WHERE current_status IN {OPEN}
            GROUP BY employee_code ORDER BY open_tasks DESC, employee_code LIMIT 15""",
    ),
)
PAGES = ("state", "naive", "cached")


def state_panels() -> tuple[tuple[str, str], ...]:
    from flows.dashboard import PANELS

    return tuple((p.name, p.sql) for p in PANELS if "pipeline_state" in p.sql or "mart_" in p.sql)


def _rows(client: Any, sql: str) -> list[dict[str, Any]]:
    result = client.query(sql)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def _page_loader(page: str, client: Any) -> tuple[Callable[[], int], Callable[[], None]]:
    """(load one page → rows shown, close)."""
    if page == "naive":
        panels = NAIVE_PANELS
    elif page in ("state", "cached"):
        panels = state_panels()
    else:
        raise ValueError(f"unknown dashboard page {page!r}; choose from {PAGES}")

    if page != "cached":
        return (lambda: sum(len(_rows(client, sql)) for _, sql in panels)), (lambda: None)

    from flows.cache import QueryCache
    from flows.redis_link import RedisLink
    from flows.settings import FlowSettings

    settings = FlowSettings()
    link = RedisLink(settings, logging.getLogger("bench.dashboard"))
    cache = QueryCache(settings, link)
    if link.client() is None:
        raise RuntimeError(f"Redis at {settings.redis_url} is unreachable: no cache to measure")

    def load() -> int:
        total = 0
        for name, sql in panels:
            total += len(cache.get_or_compute(name, partial(_rows, client, sql)).rows)
        return total

    return load, link.close


def latencies(page: str, runs: int) -> dict[str, Any]:
    """Seconds of each of `runs` page loads (plus, for `cached`, the first load that fills it)."""
    from loader.clients import connect_clickhouse
    from loader.settings import Settings

    client = connect_clickhouse(Settings())
    load, close = _page_loader(page, client)
    try:
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        rows = load()  # warm-up: plans, marks and (for `cached`) the cache fill
        out["first_load_s"] = time.perf_counter() - t0
        out["rows_per_page"] = rows
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            load()
            samples.append(time.perf_counter() - t0)
        out["samples_s"] = samples
        return out
    finally:
        close()
        client.close()
