"""Page contents: rows read through `web.data.Reader`, turned into what the templates show.

Pure functions of the rows and the clock (`now_ms`), so ages are computed at render time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flows.live_lag import LiveLag, LiveLevel, live_lag
from web import charts
from web import data as q
from web.data import Reader, ReadStats, Result
from web.settings import WebSettings

STAGES = ("intake", "review", "processing", "quality_check", "approval", "delivered")
OPEN_STATUSES = ("assigned", "in_progress")
SORTS = {
    "open_tasks": "open tasks",
    "oldest": "oldest open task",
    "employee_code": "code",
    "employee_name": "name",
    "team": "team",
}
DEFAULT_SORT = ("open_tasks", "desc")


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def fmt_time(ms: int | None) -> str:
    if not ms:
        return "never"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def fmt_age(seconds: float | None) -> str:
    """A duration the way a person says it: "42 min", "5 h 3 min", "3 d 4 h"."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 60:
        return "under 1 min"
    minutes = s // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def age_since(ms: int | None, now: int) -> str:
    return fmt_age((now - ms) / 1000) if ms else ""


def stage_order(stage: str) -> int:
    return STAGES.index(stage) + 1 if stage in STAGES else 0


# -- the trust banner ----------------------------------------------------------------------------
@dataclass
class Trust:
    level: str  # "ok", "warn", "error", "none"
    label: str  # the word that says it without colour: "OK", "Warning", "Failed", "No data"
    headline: str
    details: list[str] = field(default_factory=list)
    error: str = ""
    live: LiveLag | None = None  # the live updates' state; None: could not be read


BANNER: list[tuple[q.Query, dict[str, Any]]] = [(q.TRUST, {}), (q.DRIFT, {})]


def live(reader: Reader, settings: WebSettings, stats: ReadStats) -> LiveLag | None:
    """How far behind the live updates are (None when `ops` cannot be read: the run history
    line says why)."""
    result = reader.read(q.LIVE_LAG, stats)
    return live_lag(result.rows, settings.web_lag_warn_seconds) if result.ok else None


def trust(reader: Reader, settings: WebSettings, stats: ReadStats, now: int) -> Trust:
    banner = _trust(reader, settings, stats, now)
    banner.live = live(reader, settings, stats)
    if (
        banner.live is not None
        and banner.live.level == LiveLevel.behind
        and banner.level in ("ok", "none")
    ):
        banner.level, banner.label = "warn", "Warning"
    return banner


def _trust(reader: Reader, settings: WebSettings, stats: ReadStats, now: int) -> Trust:
    t = reader.read(q.TRUST, stats)
    d = reader.read(q.DRIFT, stats)
    if not t.ok:
        return Trust("none", "No data", "The run history could not be read", error=t.error)
    if not t.rows or not t.rows[0]["last_run_ms"]:
        return Trust("none", "No data", "No flow run recorded yet")
    r = t.rows[0]
    build_ms = r["last_build_ms"] or None
    ok_ms = r["last_ok_ms"] or None
    run_ms = r["last_run_ms"] or None
    failed_sync_ms = r["last_failed_sync_ms"] or None
    details: list[str] = []
    level = "ok"

    if build_ms:
        headline = f"Data as of {fmt_time(build_ms)} ({age_since(build_ms, now)} ago)"
    else:
        headline = "No successful build yet"
        level = "warn"

    # In step with MongoDB?
    if d.ok and d.rows:
        apart = [x for x in d.rows if x["mongo_count"] != x["clickhouse_count"]]
        if apart:
            n = sum(abs(int(x["mongo_count"]) - int(x["clickhouse_count"])) for x in apart)
            where = ", ".join(
                f"{x['collection']}: MongoDB {x['mongo_count']:,}, warehouse "
                f"{x['clickhouse_count']:,}"
                for x in apart
            )
            details.append(f"{n:,} documents differ from MongoDB ({where})")
            level = "warn"
        else:
            as_of = min(x["checked_ms"] for x in d.rows)
            details.append(f"In step with MongoDB as of {fmt_time(as_of)}")
    else:
        details.append("Not compared with MongoDB yet")

    # Did the last run fail? A sync can also fail outside a flow run (before it starts, or
    # `python -m loader sync`): one that failed after the last flow run ended counts too. (A
    # failed attempt inside a run that then retried and succeeded does not.)
    failed_text = ""
    run_end_ms = r["last_run_end_ms"] or 0
    if run_ms and r["last_run_failed"]:
        failed_text = f"The last run failed ({fmt_time(run_ms)}): {r['last_run_error']}"
    elif failed_sync_ms and failed_sync_ms > run_end_ms:
        message = r["last_failed_sync_message"]
        failed_text = f"The last sync failed ({fmt_time(failed_sync_ms)}): {message}"
    if failed_text:
        details.insert(0, failed_text.strip()[:400] + " — the figures below are from before it.")
        level = "error"

    stale_min = settings.stale_after_minutes
    if ok_ms is None or (now - ok_ms) / 60_000 > stale_min:
        since = f"for {age_since(ok_ms, now)}" if ok_ms else "yet"
        details.insert(
            0 if level != "error" else 1,
            f"No successful sync {since} (warning after {fmt_age(stale_min * 60)}): "
            "the data may be out of date.",
        )
        if level == "ok":
            level = "warn"
    label = {"ok": "OK", "warn": "Warning", "error": "Failed"}[level]
    return Trust(level, label, headline, details)


# -- overview ------------------------------------------------------------------------------------
@dataclass
class Section:
    """One panel: its rows (or the reason it has none) and an optional chart."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    chart: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _section(result: Result) -> Section:
    return Section(rows=list(result.rows), error=result.error)


def _int(value: Any, default: int) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def funnel_section(result: Result) -> Section:
    sec = _section(result)
    per: dict[str, dict[str, Any]] = {}
    for r in result.rows:
        s = per.setdefault(
            r["stage"],
            {"name": r["stage"], "order": int(r["stage_order"]), "open": 0, "closed": 0},
        )
        s["open" if r["is_open"] else "closed"] += int(r["files"])
    stages = sorted(per.values(), key=lambda s: (s["order"] == 0, s["order"], s["name"]))
    for s in stages:
        s["total"] = s["open"] + s["closed"]
        s["known"] = s["order"] != 0
    sec.rows = stages
    sec.extra = {
        "total": sum(s["total"] for s in stages),
        "open": sum(s["open"] for s in stages),
        "closed": sum(s["closed"] for s in stages),
    }
    if stages:
        sec.chart = charts.funnel(stages)
    return sec


def workload_section(
    reader: Reader,
    stats: ReadStats,
    settings: WebSettings,
    params: dict[str, str],
    now: int,
) -> Section:
    threshold = max(1, _int(params.get("overloaded"), settings.web_overloaded_tasks))
    sort = params.get("sort", DEFAULT_SORT[0])
    if sort not in SORTS:
        sort = DEFAULT_SORT[0]
    direction = "asc" if params.get("dir") == "asc" else "desc"
    if "sort" not in params:
        direction = DEFAULT_SORT[1]
    only = params.get("only") == "overloaded"
    summary = reader.read(q.WORKLOAD_SUMMARY, stats, threshold=threshold)
    totals = summary.first or {"employees": 0, "overloaded": 0, "open_total": 0}
    count = int(totals["overloaded"] if only else totals["employees"])
    size = settings.web_page_size
    pages = max(1, -(-count // size))
    page = min(max(1, _int(params.get("page"), 1)), pages)
    result = reader.read(
        q.workload_page(sort, direction, only),
        stats,
        threshold=threshold,
        limit=size,
        offset=(page - 1) * size,
    )
    sec = _section(result)
    sec.error = summary.error or result.error
    for row in sec.rows:
        row["overloaded"] = int(row["open_tasks"]) >= threshold
        row["oldest_age"] = age_since(row["oldest_open_ms"], now)
    sec.extra = {
        "threshold": threshold,
        "default_threshold": settings.web_overloaded_tasks,
        "sort": sort,
        "dir": direction,
        "only": only,
        "page": page,
        "pages": pages,
        "count": count,
        "employees": int(totals["employees"]),
        "overloaded": int(totals["overloaded"]),
        "first": (page - 1) * size + 1 if count else 0,
        "last": min(page * size, count),
        "open_total": int(totals["open_total"] or 0),
        "sorts": SORTS,
    }
    return sec


OVERVIEW = (
    q.BACKLOG,
    q.BACKLOG_DAILY,
    q.THROUGHPUT,
    q.AGEING,
    q.LONGEST_WAITING_Q,
    q.ALERTS,
    q.RUNS,
    q.RUN_STEPS,
    q.DBT_NODES,
)


def overview(
    reader: Reader, settings: WebSettings, params: dict[str, str], stats: ReadStats
) -> dict[str, Any]:
    now = now_ms()
    threshold = max(1, _int(params.get("overloaded"), settings.web_overloaded_tasks))
    reader.prefetch(
        stats,
        [
            *((query, {}) for query in OVERVIEW),
            (q.WORKLOAD_SUMMARY, {"threshold": threshold}),
            *BANNER,
        ],
    )
    funnel = funnel_section(reader.read(q.BACKLOG, stats))
    orders = {s["name"]: s["order"] for s in funnel.rows}

    backlog_daily = _section(reader.read(q.BACKLOG_DAILY, stats))
    if backlog_daily.rows:
        backlog_daily.chart = charts.lines_by_stage(backlog_daily.rows, "open_tasks", "open tasks")
        last_day = backlog_daily.rows[-1]["date"]
        backlog_daily.extra["latest"] = [r for r in backlog_daily.rows if r["date"] == last_day]

    throughput = _section(reader.read(q.THROUGHPUT, stats))
    if throughput.rows:
        so = {r["stage"]: int(r["stage_order"]) for r in throughput.rows}
        throughput.chart = charts.lines_by_stage(
            throughput.rows, "tasks_done", "tasks done", step=False, markers=True
        )
        per_day: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in throughput.rows:
            day = per_day[r["date"]]
            day["assigned"] += int(r["tasks_assigned"])
            day["done"] += int(r["tasks_done"])
            day["rejected"] += int(r["tasks_rejected"])
        throughput.extra["days"] = sorted(per_day.items(), reverse=True)
        throughput.extra["stages"] = sorted(so, key=lambda s: (so[s] == 0, so[s], s))
        by_stage: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in throughput.rows:
            by_stage[r["stage"]]["done"] += int(r["tasks_done"])
            by_stage[r["stage"]]["assigned"] += int(r["tasks_assigned"])
            by_stage[r["stage"]]["rejected"] += int(r["tasks_rejected"])
        throughput.extra["by_stage"] = by_stage

    ageing = _section(reader.read(q.AGEING, stats))
    if ageing.rows:
        stages: list[str] = []
        buckets: list[tuple[int, str]] = []
        files: dict[tuple[str, str], int] = {}
        opens: dict[tuple[str, str], int] = {}
        for r in ageing.rows:
            if r["stage"] not in stages:
                stages.append(r["stage"])
            b = (int(r["age_bucket_order"]), r["age_bucket"])
            if b not in buckets:
                buckets.append(b)
            files[(r["stage"], r["age_bucket"])] = int(r["files"])
            opens[(r["stage"], r["age_bucket"])] = int(r["open_files"])
        names = [b[1] for b in sorted(buckets)]
        ageing.chart = charts.ageing(stages, names, files)
        ageing.extra = {"stages": stages, "buckets": names, "files": files, "open": opens}

    workload = workload_section(reader, stats, settings, params, now)

    waiting = _section(reader.read(q.LONGEST_WAITING_Q, stats))
    for r in waiting.rows:
        r["age"] = age_since(r["assigned_ms"], now)

    alerts = _section(reader.read(q.ALERTS, stats))
    runs = runs_section(reader, stats, now)
    nodes = _section(reader.read(q.DBT_NODES, stats))
    for n in nodes.rows:
        parts = n["step"].split(":", 2)
        n["name"] = parts[2] if len(parts) == 3 else n["step"]
        n["type"] = parts[1] if len(parts) == 3 else ""
    if nodes.rows:
        nodes.chart = charts.dbt_nodes(nodes.rows)
        nodes.extra["run"] = nodes.rows[0]["run_id"]

    return {
        "funnel": funnel,
        "backlog_daily": backlog_daily,
        "throughput": throughput,
        "ageing": ageing,
        "workload": workload,
        "waiting": waiting,
        "alerts": alerts,
        "runs": runs,
        "nodes": nodes,
        "orders": orders,
    }


def runs_section(reader: Reader, stats: ReadStats, now: int) -> Section:
    runs = _section(reader.read(q.RUNS, stats))
    steps = reader.read(q.RUN_STEPS, stats)
    for r in runs.rows:
        r["label"] = fmt_time(r["started_ms"]).replace(" UTC", "") + " · " + r["run_id"][-6:]
        r["duration_s"] = max(0, (r["ended_ms"] or 0) - (r["started_ms"] or 0)) / 1000
        r["ago"] = age_since(r["started_ms"], now)
    per_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in steps.rows:
        per_run[s["run_id"]].append(s)
    for r in runs.rows:
        r["steps"] = per_run.get(r["run_id"], [])
    if runs.rows and steps.ok:
        runs.chart = charts.run_steps(runs.rows, steps.rows)
    return runs


# -- one file --------------------------------------------------------------------------------
def file_page(reader: Reader, file_id: str, stats: ReadStats) -> dict[str, Any]:
    now = now_ms()
    reader.prefetch(
        stats,
        [(q.FILE_STATE, {"file_id": file_id}), (q.FILE_HISTORY, {"file_id": file_id}), *BANNER],
    )
    state = reader.read(q.FILE_STATE, stats, file_id=file_id)
    history = reader.read(q.FILE_HISTORY, stats, file_id=file_id)
    current = dict(state.first) if state.first else None
    if current:
        current["age"] = age_since(current["assigned_ms"], now)
        current["open"] = current["status"] in OPEN_STATUSES
    tasks = []
    for i, t in enumerate(history.rows, start=1):
        task = dict(t)
        finished = t["status"] not in OPEN_STATUSES
        task["end_ms"] = t["updated_ms"] if finished else None
        task["label"] = f"{i}. {t['stage']}"
        task["status_text"] = t["status"] + (" (deleted)" if t["is_deleted"] else "")
        task["duration"] = fmt_age(((task["end_ms"] or now) - t["assigned_ms"]) / 1000)
        task["current"] = bool(current and t["task_id"] == current["task_id"])
        tasks.append(task)
    orders = {s: stage_order(s) for s in {t["stage"] for t in tasks}}
    chart = charts.timeline(tasks, now, orders) if tasks else None
    return {
        "file_id": file_id,
        "current": current,
        "tasks": tasks,
        "chart_spec": chart,
        "problem": state.error or history.error,
    }


# -- one employee ----------------------------------------------------------------------------
def employee_page(
    reader: Reader, settings: WebSettings, code: str, stats: ReadStats
) -> dict[str, Any]:
    now = now_ms()
    reader.prefetch(
        stats,
        [
            *((query, {"code": code}) for query in (q.EMPLOYEE, q.EMPLOYEE_OPEN)),
            (q.EMPLOYEE_THROUGHPUT, {"code": code}),
            *BANNER,
        ],
    )
    emp = reader.read(q.EMPLOYEE, stats, code=code)
    person = dict(emp.first) if emp.first else None
    open_rows = reader.read(q.EMPLOYEE_OPEN, stats, code=code)
    done = reader.read(q.EMPLOYEE_THROUGHPUT, stats, code=code)
    tasks = [dict(r, age=age_since(r["assigned_ms"], now)) for r in open_rows.rows]
    if person:
        person["oldest_age"] = age_since(person["oldest_open_ms"], now)
        person["overloaded"] = int(person["open_tasks"]) >= settings.web_overloaded_tasks
    orders = {s: stage_order(s) for s in {r["stage"] for r in done.rows}}
    chart = charts.stacked_by_stage(done.rows, "done", "tasks done", orders) if done.rows else None
    per_day: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in done.rows:
        per_day[r["date"]]["done"] += int(r["done"])
        per_day[r["date"]]["rejected"] += int(r["rejected"])
    return {
        "code": code,
        "person": person,
        "tasks": tasks,
        "shown_limit": q.EMPLOYEE_OPEN_SHOWN,
        "chart_spec": chart,
        "days": sorted(per_day.items(), reverse=True),
        "done_total": sum(int(r["done"]) for r in done.rows),
        "rejected_total": sum(int(r["rejected"]) for r in done.rows),
        "throughput_days": q.THROUGHPUT_DAYS,
        "threshold": settings.web_overloaded_tasks,
        "problem": emp.error or open_rows.error or done.error,
    }


# -- search --------------------------------------------------------------------------------------
def search(reader: Reader, text: str, stats: ReadStats) -> dict[str, Any]:
    text = text.strip()
    if not text:
        return {"q": "", "files": [], "employees": [], "more_files": False, "more_employees": False}
    reader.prefetch(
        stats, [(q.SEARCH_FILES, {"q": text}), (q.SEARCH_EMPLOYEES, {"q": text}), *BANNER]
    )
    files = reader.read(q.SEARCH_FILES, stats, q=text)
    people = reader.read(q.SEARCH_EMPLOYEES, stats, q=text)
    return {
        "q": text,
        "files": files.rows[: q.SEARCH_LIMIT],
        "more_files": len(files.rows) > q.SEARCH_LIMIT,
        "employees": people.rows[: q.SEARCH_LIMIT],
        "more_employees": len(people.rows) > q.SEARCH_LIMIT,
        "problem": files.error or people.error,
    }
