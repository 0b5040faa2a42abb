"""`python -m flows.dashboard` (`make dashboard`): the current pipeline, through the query cache.

Panels: how far behind MongoDB the live updates are (never cached: `flows.live_lag`), whether
the warehouse is in step with MongoDB, files per stage and status, the
longest-waiting open files, employee workload, and the last runs' timings. Every query goes
through `QueryCache` (keyed by the data version each landed sync bumps); a query slower than
`PIPELINE_ALERT_QUERY_SECONDS` raises an alert.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from rich.console import Console
from rich.table import Table

from flows import live_lag, ops
from flows.alerts import check_query_duration, raise_alerts
from flows.cache import QueryCache, Rows
from flows.redis_link import RedisLink
from flows.settings import FlowSettings
from loader import errors
from web.settings import WebSettings  # PIPELINE_WEB_LAG_WARN_SECONDS, one threshold for both

# Open = still needs work from the assignee (dbt var `open_statuses`).
OPEN = "status IN ('assigned', 'in_progress')"


@dataclass(frozen=True)
class PanelQuery:
    name: str
    title: str
    sql: str
    # Cache lifetime override: run history changes with every run, landed sync or not.
    ttl_seconds: int | None = None


PANELS: tuple[PanelQuery, ...] = (
    PanelQuery(
        "in_step",
        "In step with MongoDB? (document counts at the last flow run)",
        """
        SELECT collection,
               argMax(mongo_count, checked_at) AS mongodb,
               argMax(clickhouse_count, checked_at) AS warehouse,
               if(mongodb = warehouse, 'in step',
                  concat(toString(abs(toInt64(mongodb) - toInt64(warehouse))), ' differ'))
                   AS state,
               formatDateTime(max(checked_at), '%Y-%m-%d %H:%i:%S UTC') AS as_of
        FROM ops.drift_checks
        GROUP BY collection
        ORDER BY collection
        """,
        ttl_seconds=30,
    ),
    PanelQuery(
        "files_by_stage_status",
        "Files per stage and status",
        """
        SELECT stage, status, files,
               round(max_time_in_stage_seconds / 86400, 1) AS max_days_in_stage
        FROM analytics.mart_backlog_by_stage
        ORDER BY stage_order, status
        """,
    ),
    PanelQuery(
        "longest_waiting",
        "Longest-waiting open files",
        f"""
        SELECT file_id, stage, status, employee_name,
               formatDateTime(assigned_at, '%Y-%m-%d %H:%i') AS assigned,
               round(time_in_stage_seconds / 86400, 1) AS days_in_stage
        FROM analytics.pipeline_state
        WHERE {OPEN}
        ORDER BY time_in_stage_seconds DESC, file_id
        LIMIT 10
        """,
    ),
    PanelQuery(
        "employee_workload",
        "Employee workload (open tasks)",
        """
        SELECT employee_code, employee_name, team, open_tasks,
               round(oldest_open_task_age_seconds / 86400, 1) AS oldest_open_days
        FROM analytics.mart_employee_workload
        WHERE open_tasks > 0
        ORDER BY open_tasks DESC, employee_code
        LIMIT 15
        """,
    ),
    PanelQuery(
        "last_runs",
        "Last runs",
        f"""
        SELECT right(run_id, 8) AS run,  -- Prefect's run ids are UUIDv7: the head is a clock
               formatDateTime(fromUnixTimestamp64Milli(started_ms), '%Y-%m-%d %H:%i:%S')
                   AS run_started,
               outcome,
               round((ended_ms - started_ms) / 1000, 2) AS total_s,
               rows_loaded, load_s, dbt_s, dbt_nodes,
               substring(note, 1, 90) AS message  -- not "note": no alias over its column
        FROM ({ops.last_runs_sql(8)})
        ORDER BY started_ms DESC
        """,
        ttl_seconds=30,
    ),
)


@dataclass
class Panel:
    query: PanelQuery
    rows: Rows
    hit: bool
    seconds: float  # of the ClickHouse query; 0 on a cache hit


def _query(ch: Client, sql: str) -> Rows:
    result = ch.query(sql)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def collect(
    settings: FlowSettings,
    link: RedisLink,
    ch: Client,
    logger: logging.Logger | logging.LoggerAdapter,
    panels: tuple[PanelQuery, ...] = PANELS,
) -> list[Panel]:
    """Every panel's rows through the cache; alerts for queries over the threshold."""
    cache = QueryCache(settings, link)
    out: list[Panel] = []
    alerts = []
    for panel in panels:
        elapsed = 0.0

        def compute(sql: str = panel.sql) -> Rows:
            nonlocal elapsed
            t0 = time.perf_counter()
            rows = _query(ch, sql)
            elapsed = time.perf_counter() - t0
            return rows

        try:
            lookup = cache.get_or_compute(
                panel.name,
                compute,
                # The SQL is part of the key: a changed query never gets an old result shape.
                params={"sql": panel.sql},
                ttl_seconds=panel.ttl_seconds,
            )
        except DatabaseError as exc:  # e.g. marts not built yet: show it, cache nothing
            text = " ".join(str(exc).split())[:300]
            if "UNKNOWN_TABLE" in text or "UNKNOWN_DATABASE" in text:
                text += " -- no data yet: run `make sync` first"
            rows = [{"error": text}]
            out.append(Panel(panel, rows, False, elapsed))
            continue
        out.append(Panel(panel, lookup.rows, lookup.hit, elapsed))
        alerts.append(check_query_duration(settings, panel.name, elapsed))
    raise_alerts(settings, ch, alerts, logger)
    return out


LIVE_PANEL = PanelQuery("live_updates", "Live updates (change-stream followers)", live_lag.LAG_SQL)


def live_panel(ch: Client, warn_seconds: float) -> Panel:
    """The live updates' state, straight from ClickHouse (it moves every fraction of a
    second): one line with the verdict, then one per follower."""
    t0 = time.perf_counter()
    try:
        rows = _query(ch, LIVE_PANEL.sql)
    except DatabaseError as exc:
        return Panel(LIVE_PANEL, [{"error": " ".join(str(exc).split())[:300]}], False, 0.0)
    state = live_lag.live_lag(rows, warn_seconds)
    shown: Rows = [{"collection": "(all)", "state": state.text, "lag_s": "", "saved_ago_s": ""}]
    shown += [
        {
            "collection": r["collection"],
            "state": "",
            "lag_s": round(float(r["lag_seconds"]), 1),
            "saved_ago_s": round(float(r["saved_age_s"]), 1),
        }
        for r in rows
    ]
    return Panel(LIVE_PANEL, shown, False, time.perf_counter() - t0)


def render(panels: list[Panel], console: Console, cache_line: str = "") -> None:
    for panel in panels:
        source = "cache" if panel.hit else f"ClickHouse {panel.seconds * 1000:.0f} ms"
        table = Table(title=f"{panel.query.title}  [dim]({source})[/dim]", title_justify="left")
        columns = list(panel.rows[0]) if panel.rows else ["(no rows)"]
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in panel.rows:
            table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
        console.print(table)
    if cache_line:
        console.print(cache_line)


def main(argv: list[str] | None = None) -> None:
    args = errors.cli_parser("python -m flows.dashboard", __doc__).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    errors.quiet_driver_logs(args.verbose)
    with errors.console_logs_without_tracebacks(not args.verbose):
        errors.run_cli(_show, verbose=args.verbose)


def _show() -> None:
    logger = logging.getLogger("flows.dashboard")
    settings = FlowSettings()
    link = RedisLink(settings, logger)
    ch = ops.connect(settings)
    try:
        ops.ensure_tables(ch)
        warn = WebSettings().web_lag_warn_seconds
        panels = [live_panel(ch, warn), *collect(settings, link, ch, logger)]
        stats = QueryCache(settings, link).stats()
        line = ""
        if stats is not None and stats.hit_rate is not None:
            line = f"cache: {stats.hits} hits, {stats.misses} misses ({stats.hit_rate:.0%})"
        # Wide enough for every panel when piped (a CI log, `make demo | tee`); a TTY sets its own.
        render(panels, Console(width=None if sys.stdout.isatty() else 160), line)
    finally:
        link.close()
        ch.close()


if __name__ == "__main__":
    main()
