"""What the pages read: small pre-aggregated relations (the marts, `pipeline_state`, `ops.*`),
every query through the Redis query cache (`flows.cache.QueryCache`).

Keys: the data version the flow bumps after each landed build (the marts), plus the runs version
it bumps when any run ends (`scope="runs"`: the run history, alerts, the trust banner). Times
are read as Unix milliseconds and turned into ages when a page is rendered, so a cached row
never freezes a "time in stage"; only the ageing buckets depend on the clock in SQL, and those
are cached for `PIPELINE_WEB_CLOCK_TTL_SECONDS` at most.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from flows import live_lag, ops
from flows.cache import QueryCache, Rows
from flows.redis_link import REDIS_ERRORS, RedisLink
from web.settings import WebSettings

OPEN = "status IN ('assigned', 'in_progress')"
# Page sizes of the lists that are not paged.
LONGEST_WAITING = 15
RUNS_SHOWN = 10
ALERTS_SHOWN = 20
DBT_NODES_SHOWN = 15
THROUGHPUT_DAYS = 30
BACKLOG_DAYS = 90
SEARCH_LIMIT = 20
EMPLOYEE_OPEN_SHOWN = 25


@dataclass(frozen=True)
class Query:
    name: str
    sql: str
    scope: str = "data"  # "runs": also keyed by the runs version (reads ops.*)
    clock: bool = False  # the SQL reads now(): cached for the clock TTL at most
    fresh: bool = False  # never cached: changes every fraction of a second (a tiny read)


def ms(column: str) -> str:
    return f"toUnixTimestamp64Milli({column})"


# -- overview ------------------------------------------------------------------------------------
BACKLOG = Query(
    "web_backlog",
    """
    SELECT stage, stage_order, status, is_open, files, toUnixTimestamp64Milli(oldest_assigned_at)
        AS oldest_assigned_ms
    FROM analytics.mart_backlog_by_stage
    ORDER BY stage_order = 0, stage_order, stage, status
    """,
)
# Open tasks per stage at the end of each day: tasks assigned so far minus tasks finished so far,
# both from the daily throughput mart (a few rows per day and stage).
BACKLOG_DAILY = Query(
    "web_backlog_daily",
    f"""
    SELECT toString(day) AS date, stage, stage_order, open_tasks
    FROM (
        SELECT day, stage, any(stage_order) AS stage_order,
               sum(toInt64(sum(tasks_assigned)) - sum(tasks_done) - sum(tasks_rejected))
                   OVER (PARTITION BY stage ORDER BY day) AS open_tasks
        FROM analytics.mart_daily_throughput
        GROUP BY day, stage
    )
    WHERE day > (SELECT max(day) FROM analytics.mart_daily_throughput) - {BACKLOG_DAYS}
    ORDER BY day, stage_order, stage
    """,
)
THROUGHPUT = Query(
    "web_throughput",
    f"""
    SELECT toString(day) AS date, stage, stage_order, tasks_assigned, tasks_done, tasks_rejected
    FROM analytics.mart_daily_throughput
    WHERE day > (SELECT max(day) FROM analytics.mart_daily_throughput) - {THROUGHPUT_DAYS}
    ORDER BY day, stage_order, stage
    """,
)
AGEING = Query(
    "web_ageing",
    """
    SELECT stage, stage_order, age_bucket, age_bucket_order, files, open_files
    FROM analytics.mart_file_ageing
    ORDER BY stage_order = 0, stage_order, stage, age_bucket_order
    """,
    clock=True,
)
WORKLOAD_SUMMARY = Query(
    "web_workload_summary",
    """
    SELECT count() AS employees, countIf(open_tasks >= {threshold:UInt64}) AS overloaded,
           sum(open_tasks) AS open_total
    FROM analytics.mart_employee_workload
    """,
)
# The workload table's orders; every one ends with the code, ascending, to break ties.
WORKLOAD_ORDERS = {
    ("open_tasks", "desc"): "open_tasks DESC",
    ("open_tasks", "asc"): "open_tasks ASC",
    ("oldest", "desc"): "oldest_open_assigned_at ASC NULLS LAST",  # the longest wait first
    ("oldest", "asc"): "oldest_open_assigned_at DESC NULLS FIRST",
    ("employee_code", "desc"): "employee_code DESC",
    ("employee_code", "asc"): "employee_code ASC",
    ("employee_name", "desc"): "lowerUTF8(employee_name) DESC",
    ("employee_name", "asc"): "lowerUTF8(employee_name) ASC",
    ("team", "desc"): "lowerUTF8(team) DESC",
    ("team", "asc"): "lowerUTF8(team) ASC",
}


def workload_page(sort: str, direction: str, only_overloaded: bool) -> Query:
    """One page of the workload table, sorted in ClickHouse (a page, not every employee, goes
    through the cache)."""
    order = WORKLOAD_ORDERS[(sort, direction)]
    where = "WHERE open_tasks >= {threshold:UInt64}" if only_overloaded else ""
    return Query(
        f"web_workload_{sort}_{direction}_{'over' if only_overloaded else 'all'}",
        f"""
        SELECT employee_code, employee_name, team, is_active, is_known_employee,
               toUInt64(open_tasks) AS open_tasks,
               if(open_tasks > 0, toUnixTimestamp64Milli(oldest_open_assigned_at), NULL)
                   AS oldest_open_ms
        FROM analytics.mart_employee_workload
        {where}
        ORDER BY {order}, employee_code
        LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}
        """,
    )


LONGEST_WAITING_Q = Query(
    "web_longest_waiting",
    f"""
    SELECT file_id, stage, status, employee_code, employee_name,
           toUnixTimestamp64Milli(assigned_at) AS assigned_ms
    FROM analytics.pipeline_state
    WHERE {OPEN}
    ORDER BY assigned_at, file_id
    LIMIT {LONGEST_WAITING}
    """,
)

# -- run history (scope "runs") ------------------------------------------------------------------
RUNS = Query("web_runs", ops.last_runs_sql(RUNS_SHOWN), scope="runs")


def _timings(kind: str, runs: str, order: str) -> str:
    """Rows of `kind` ('step' or 'dbt_node') in ops.step_timings of the runs `runs` selects."""
    return f"""
    SELECT run_id, step, status, duration_s
    FROM ops.step_timings
    WHERE kind = '{kind}' AND run_id {runs}
    ORDER BY {order}
    """


# The steps of the runs the history shows.
RUN_STEPS = Query(
    "web_run_steps",
    _timings(
        "step",
        f"""IN (
        SELECT run_id FROM ops.step_timings GROUP BY run_id
        ORDER BY min(started_at) DESC LIMIT {RUNS_SHOWN})""",
        "started_at, step",
    ),
    scope="runs",
)
# The slowest dbt nodes of the last run that built.
DBT_NODES = Query(
    "web_dbt_nodes",
    _timings(
        "dbt_node",
        """= (
        SELECT run_id FROM ops.step_timings WHERE kind = 'dbt_node'
        ORDER BY started_at DESC LIMIT 1)""",
        f"duration_s DESC, step LIMIT {DBT_NODES_SHOWN}",
    ),
    scope="runs",
)
ALERTS = Query(
    "web_alerts",
    f"""
    SELECT toUnixTimestamp64Milli(raised_at) AS raised_ms, run_id, kind, subject, value,
           threshold, message
    FROM ops.alerts
    ORDER BY raised_at DESC
    LIMIT {ALERTS_SHOWN}
    """,
    scope="runs",
)
# The trust banner: the last successful build, the last run that confirmed the warehouse
# (built, or found nothing to load), the last run and whether it failed, the latest failed sync
# (also one that failed before the flow started), and the last drift count per collection.
TRUST = Query(
    "web_trust",
    """
    WITH runs AS (
        SELECT run_id, min(started_at) AS started, max(ended_at) AS ended,
               countIf(kind = 'step' AND status = 'failed') > 0 AS failed,
               countIf(step = 'dbt_build' AND status = 'ok') > 0 AS built,
               countIf(step = 'detect_changes') > 0 AS checked,
               substring(anyIf(message, kind = 'step' AND status = 'failed'), 1, 400) AS error
        FROM ops.step_timings
        GROUP BY run_id
    )
    SELECT
        (SELECT toUnixTimestamp64Milli(max(ended)) FROM runs WHERE built AND NOT failed)
            AS last_build_ms,
        (SELECT toUnixTimestamp64Milli(max(ended)) FROM runs WHERE checked AND NOT failed)
            AS last_ok_ms,
        (SELECT toUnixTimestamp64Milli(max(started)) FROM runs) AS last_run_ms,
        (SELECT toUnixTimestamp64Milli(argMax(ended, started)) FROM runs) AS last_run_end_ms,
        (SELECT argMax(failed, started) FROM runs) AS last_run_failed,
        (SELECT argMax(error, started) FROM runs) AS last_run_error,
        (SELECT toUnixTimestamp64Milli(max(started_at)) FROM ops.sync_runs
         WHERE status = 'failed') AS last_failed_sync_ms,
        (SELECT argMax(message, started_at) FROM ops.sync_runs WHERE status = 'failed')
            AS last_failed_sync_message
    """,
    scope="runs",
)
DRIFT = Query(
    "web_drift",
    """
    SELECT collection,
           argMax(mongo_count, checked_at) AS mongo_count,
           argMax(clickhouse_count, checked_at) AS clickhouse_count,
           toUnixTimestamp64Milli(max(checked_at)) AS checked_ms
    FROM ops.drift_checks
    GROUP BY collection
    ORDER BY collection
    """,
    scope="runs",
)
# How far behind the live updates are: read on every page, never cached.
LIVE_LAG = Query("web_live_lag", live_lag.LAG_SQL, scope="runs", fresh=True)

# -- one file, one employee, search ------------------------------------------------------------
FILE_STATE = Query(
    "web_file_state",
    """
    SELECT file_id, stage, stage_order, is_known_stage, status, is_known_status, employee_code,
           employee_name, is_known_employee, toUnixTimestamp64Milli(assigned_at) AS assigned_ms,
           task_id
    FROM analytics.pipeline_state
    WHERE file_id = {file_id:String}
    """,
)
FILE_HISTORY = Query(
    "web_file_history",
    """
    SELECT task_id, stage, status, employee_code, employee_name, is_deleted,
           toUnixTimestamp64Milli(assigned_at) AS assigned_ms,
           toUnixTimestamp64Milli(updated_at) AS updated_ms
    FROM analytics.task_events
    WHERE file_id = {file_id:String}
    ORDER BY assigned_at, task_id
    """,
)
EMPLOYEE = Query(
    "web_employee",
    """
    SELECT employee_code, employee_name, team, is_active, is_deleted, is_known_employee,
           toUInt64(open_tasks) AS open_tasks,
           if(open_tasks > 0, toUnixTimestamp64Milli(oldest_open_assigned_at), NULL)
               AS oldest_open_ms
    FROM analytics.mart_employee_workload
    WHERE employee_code = {code:String}
    """,
)
EMPLOYEE_OPEN = Query(
    "web_employee_open",
    f"""
    SELECT file_id, stage, status, toUnixTimestamp64Milli(assigned_at) AS assigned_ms
    FROM analytics.pipeline_state
    WHERE employee_code = {{code:String}} AND {OPEN}
    ORDER BY assigned_at, file_id
    LIMIT {EMPLOYEE_OPEN_SHOWN}
    """,
)
EMPLOYEE_THROUGHPUT = Query(
    "web_employee_throughput",
    f"""
    SELECT toString(toDate(updated_at)) AS date, stage,
           countIf(status = 'done') AS done, countIf(status = 'rejected') AS rejected
    FROM analytics.task_events
    WHERE employee_code = {{code:String}} AND is_deleted = 0
      AND status IN ('done', 'rejected')
      AND toDate(updated_at) > (SELECT max(day) FROM analytics.mart_daily_throughput)
          - {THROUGHPUT_DAYS}
    GROUP BY date, stage
    ORDER BY date, stage
    """,
)
SEARCH_FILES = Query(
    "web_search_files",
    f"""
    SELECT file_id, stage, status
    FROM analytics.pipeline_state
    WHERE startsWith(file_id, {{q:String}})
    ORDER BY file_id
    LIMIT {SEARCH_LIMIT + 1}
    """,
)
SEARCH_EMPLOYEES = Query(
    "web_search_employees",
    f"""
    SELECT employee_code, employee_name, team, toUInt64(open_tasks) AS open_tasks
    FROM analytics.mart_employee_workload
    WHERE startsWith(lower(employee_code), lower({{q:String}}))
       OR positionCaseInsensitiveUTF8(employee_name, {{q:String}}) > 0
    ORDER BY employee_code
    LIMIT {SEARCH_LIMIT + 1}
    """,
)


@dataclass
class Result:
    rows: Rows
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def first(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None


@dataclass
class ReadStats:
    """Per request: cache hits, misses and ClickHouse time (the `Server-Timing` header)."""

    hits: int = 0
    misses: int = 0
    clickhouse_s: float = 0.0
    versions: tuple[str, str] | None = None
    # Rows fetched ahead by `Reader.prefetch`, by `memo_key`.
    memo: dict[str, Rows] = field(default_factory=dict)


def memo_key(query: Query, params: dict[str, Any]) -> str:
    return query.name + json.dumps(params, sort_keys=True, default=str)


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    if any(code in text for code in ("UNKNOWN_TABLE", "UNKNOWN_DATABASE", "code: 60", "code: 81")):
        return "no data yet: run `make sync` (or wait for the scheduled run) to build the marts"
    return text


class Reader:
    """Runs `Query`s through the cache; one per server (thread-safe: the ClickHouse client has
    no session, the Redis client a connection pool)."""

    def __init__(self, settings: WebSettings, link: RedisLink, ch: Client):
        self.settings = settings
        self.link = link
        self.ch = ch
        self.cache = QueryCache(settings, link)

    def versions(self) -> tuple[str, str] | None:
        return self.cache.versions()

    def _compute(self, query: Query, params: dict[str, Any], stats: ReadStats) -> Rows:
        t0 = time.perf_counter()
        try:
            result = self.ch.query(query.sql, parameters=params or None)
            return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
        finally:
            stats.clickhouse_s += time.perf_counter() - t0

    def prefetch(self, stats: ReadStats, wanted: list[tuple[Query, dict[str, Any]]]) -> None:
        """Fetch what the cache holds of a page's queries in one round trip; `read` then takes
        them from there and computes only the misses."""
        if stats.versions is None:
            return
        wanted = [(q, params) for q, params in wanted if not q.fresh]
        entries = [(q.name, {"sql": q.sql, **params}, q.scope) for q, params in wanted]
        for (query, params), rows in zip(
            wanted, self.cache.lookup_many(entries, stats.versions), strict=True
        ):
            if rows is not None:
                stats.memo[memo_key(query, params)] = rows

    def read(self, query: Query, stats: ReadStats, **params: Any) -> Result:
        ahead = stats.memo.pop(memo_key(query, params), None)
        if ahead is not None:
            stats.hits += 1
            return Result(ahead)
        ttl = self.settings.web_clock_ttl_seconds if query.clock else None
        try:
            if query.fresh:
                stats.misses += 1
                return Result(self._compute(query, params, stats))
            lookup = self.cache.get_or_compute(
                query.name,
                lambda: self._compute(query, params, stats),
                params={"sql": query.sql, **params},
                ttl_seconds=ttl,
                scope=query.scope,
                versions=stats.versions,
            )
        except ClickHouseError as exc:  # a missing mart or ops table: the panel says so
            stats.misses += 1
            return Result([], describe_error(exc))
        except REDIS_ERRORS as exc:  # pragma: no cover - RedisLink already absorbs these
            return Result([], f"Redis: {exc}")
        if lookup.hit:
            stats.hits += 1
        else:
            stats.misses += 1
        return Result(lookup.rows)


def dumps(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))
