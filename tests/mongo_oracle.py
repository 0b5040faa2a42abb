"""What the warehouse must show, computed in Python from MongoDB's documents alone.

The rules come from docs/ARCHITECTURE.md, not from the loader or the models, and nothing here
imports them: which documents the mapping contract accepts (`contract_problems`); the current
task of a file is its non-deleted task with the latest `(assigned_at, _id)`; open statuses are
`assigned` and `in_progress`; throughput counts tasks assigned per day of `assigned_at` and tasks
done or rejected per day of `updated_at`; ages are whole seconds from the assignment to the read
time, in buckets with literal edges (`AGE_BUCKETS`). Tests compare these with what the loader
and the analytics relations hold.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any

from bson import ObjectId, json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from clickhouse_connect.driver.client import Client
from pymongo.database import Database

STAGES = ("intake", "review", "processing", "quality_check", "approval", "delivered")
STATUSES = ("assigned", "in_progress", "done", "rejected")
OPEN_STATUSES = ("assigned", "in_progress")

# -- the mapping contract (docs/ARCHITECTURE.md, "Mapping rules") ---------------------------------
# Documents read as the server holds them: dates as milliseconds (any int64), invalid UTF-8
# kept as lone surrogates instead of failing the read.
AS_STORED = CodecOptions(
    tz_aware=False,
    datetime_conversion=DatetimeConversion.DATETIME_MS,
    unicode_decode_error_handler="surrogateescape",
)
FIELDS: dict[str, dict[str, str]] = {
    "tasks": {
        "file_id": "string",
        "stage": "string",
        "employee_code": "string",
        "employee_name": "string",
        "status": "string",
        "assigned_at": "date",
        "updated_at": "date",
    },
    "employee": {
        "employee_code": "string",
        "employee_name": "string",
        "team": "string",
        "active": "bool",
        "updated_at": "date",
    },
}
NON_EMPTY = {"tasks": {"file_id"}, "employee": {"employee_code"}}
FIRST_DATE_MS = -2_208_988_800_000  # 1900-01-01T00:00:00.000Z
LAST_DATE_MS = 10_413_791_999_999  # 2299-12-31T23:59:59.999Z
MAX_STRING_CHARS = 65_536


def contract_problems(
    doc: Mapping[str, Any], collection: str, max_string_chars: int = MAX_STRING_CHARS
) -> list[str]:
    """The names of the fields (`_id` included) by which `doc`, read with `AS_STORED`, breaks
    the mapping contract; empty when it must load."""
    broken = [] if type(doc.get("_id")) is ObjectId else ["_id"]
    for name, kind in FIELDS[collection].items():
        value = doc.get(name)  # missing and null alike
        if kind == "string":
            ok = (
                type(value) is str
                and len(value) <= max_string_chars
                and "\x00" not in value
                and _valid_utf8(value)
                and (value != "" or name not in NON_EMPTY[collection])
            )
        elif kind == "bool":
            ok = type(value) is bool
        else:
            first = 0 if name == "updated_at" else FIRST_DATE_MS  # it becomes the unsigned version
            ok = type(value) is DatetimeMS and first <= int(value) <= LAST_DATE_MS
        if not ok:
            broken.append(name)
    return broken


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def stored_id(value: Any) -> str:
    """`_id` as ClickHouse stores it: ObjectId hex, any other value as canonical extended JSON."""
    if isinstance(value, ObjectId):
        return str(value)
    return json_util.dumps(value, json_options=json_util.CANONICAL_JSON_OPTIONS)


def contract_row(doc: Mapping[str, Any], collection: str) -> tuple[Any, ...]:
    """The values a loaded document must have in `raw.<collection>`, in `FIELDS` order (dates
    in milliseconds, booleans as 0/1)."""
    return tuple(
        int(doc[name]) if kind in ("date", "bool") else doc[name]
        for name, kind in FIELDS[collection].items()
    )


def ms(value: datetime) -> datetime:
    """Naive UTC, millisecond precision: how both MongoDB and ClickHouse values compare."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def current_task_per_file(db: Database) -> dict[str, tuple[Any, ...]]:
    """file_id -> (stage, employee_code, status, assigned_at, task_id) of its current task."""
    best: dict[str, tuple[Any, ...]] = {}
    for doc in db.tasks.find({}):
        row = (doc["stage"], doc["employee_code"], doc["status"], ms(doc["assigned_at"]))
        row += (str(doc["_id"]),)
        current = best.get(doc["file_id"])
        if current is None or (row[3], row[4]) > (current[3], current[4]):
            best[doc["file_id"]] = row
    return best


def warehouse_state(ch: Client) -> dict[str, tuple[Any, ...]]:
    """The same shape, read from `analytics.pipeline_state`."""
    rows = ch.query(
        "SELECT file_id, stage, employee_code, status, assigned_at, task_id "
        "FROM analytics.pipeline_state"
    ).result_rows
    return {r[0]: (r[1], r[2], r[3], ms(r[4]), r[5]) for r in rows}


def backlog(db: Database) -> Counter[tuple[str, str]]:
    """Files per (current stage, current status)."""
    return Counter((s[0], s[2]) for s in current_task_per_file(db).values())


def open_work(db: Database) -> Counter[str]:
    """Files whose current task is open, per assignee."""
    return Counter(s[1] for s in current_task_per_file(db).values() if s[2] in OPEN_STATUSES)


def throughput(db: Database) -> dict[tuple[date, str], tuple[int, int, int]]:
    """(day, stage) -> (tasks assigned, done, rejected)."""
    counts: Counter[tuple[date, str, str]] = Counter()
    for doc in db.tasks.find({}):
        counts[(ms(doc["assigned_at"]).date(), doc["stage"], "assigned")] += 1
        if doc["status"] in ("done", "rejected"):
            counts[(ms(doc["updated_at"]).date(), doc["stage"], doc["status"])] += 1
    days = {(d, s) for d, s, _ in counts}
    return {
        (d, s): (counts[(d, s, "assigned")], counts[(d, s, "done")], counts[(d, s, "rejected")])
        for d, s in days
    }


def live_tasks(db: Database) -> dict[str, tuple[Any, ...]]:
    """task_id -> (file_id, stage, employee_code, status, assigned_at) of every document."""
    return {
        str(d["_id"]): (
            d["file_id"],
            d["stage"],
            d["employee_code"],
            d["status"],
            ms(d["assigned_at"]),
        )
        for d in db.tasks.find({})
    }


def differences_from_mongo(db: Database, ch: Client) -> dict[str, Any]:
    """Every analytics relation compared with its recomputation from MongoDB: an empty dict
    when they all agree, else relation -> (expected, found) of the first that differ."""
    found: dict[str, Any] = {}
    events = {
        r[0]: (r[1], r[2], r[3], r[4], ms(r[5]))
        for r in ch.query(
            "SELECT task_id, file_id, stage, employee_code, status, assigned_at "
            "FROM analytics.task_events WHERE is_deleted = 0"
        ).result_rows
    }
    found["task_events"] = events
    found["pipeline_state"] = warehouse_state(ch)
    found["mart_backlog_by_stage"] = Counter(
        {
            (r[0], r[1]): r[2]
            for r in ch.query(
                "SELECT stage, status, files FROM analytics.mart_backlog_by_stage"
            ).result_rows
        }
    )
    found["mart_employee_workload"] = Counter(
        {
            r[0]: r[1]
            for r in ch.query(
                "SELECT employee_code, open_tasks FROM analytics.mart_employee_workload "
                "WHERE open_tasks > 0"
            ).result_rows
        }
    )
    found["mart_daily_throughput"] = {
        (r[0], r[1]): (r[2], r[3], r[4])
        for r in ch.query(
            "SELECT day, stage, tasks_assigned, tasks_done, tasks_rejected "
            "FROM analytics.mart_daily_throughput"
        ).result_rows
    }
    expected = {
        "task_events": live_tasks(db),
        "pipeline_state": current_task_per_file(db),
        "mart_backlog_by_stage": backlog(db),
        "mart_employee_workload": open_work(db),
        "mart_daily_throughput": throughput(db),
    }
    return {
        name: (expected[name], found[name]) for name in expected if expected[name] != found[name]
    }


# -- marts at a fixed read time (`as_of`, the dbt var that freezes the models' clock) -------------
# Age buckets: (upper bound in seconds, exclusive; label), then "30d+".
AGE_BUCKETS = (
    (86_400, "0-1d"),
    (259_200, "1-3d"),
    (604_800, "3-7d"),
    (1_209_600, "7-14d"),
    (2_592_000, "14-30d"),
)
LAST_BUCKET = "30d+"


def age_bucket(seconds: int) -> tuple[int, str]:
    """(position, label) of an age in seconds."""
    for position, (upper, label) in enumerate(AGE_BUCKETS, start=1):
        if seconds < upper:
            return position, label
    return len(AGE_BUCKETS) + 1, LAST_BUCKET


def age_seconds(assigned_at: datetime, as_of: datetime) -> int:
    """Whole seconds from an assignment to the read time."""
    return int((ms(as_of) - ms(assigned_at)).total_seconds() // 1)


def stage_order(stage: str) -> int:
    """1-based position in the pipeline; 0 outside it."""
    return STAGES.index(stage) + 1 if stage in STAGES else 0


def employee_dimension(
    live: Iterable[Mapping[str, Any]], deleted: Iterable[Mapping[str, Any]] = ()
) -> dict[str, dict[str, Any]]:
    """code -> the employee row of each code ever loaded: among the documents with that code a
    live one wins over a deleted one, then the most recently updated, then the larger id; the
    code counts as deleted only when every document with it is. `deleted`: the last known
    versions of documents deleted from MongoDB since they were loaded."""
    docs: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for is_deleted, source in ((0, live), (1, deleted)):
        for d in source:
            rank = (is_deleted == 0, ms(d["updated_at"]), str(d["_id"]))
            docs[d["employee_code"]].append((rank, is_deleted, d))
    out = {}
    for code, candidates in docs.items():
        _, _, winner = max(candidates, key=lambda c: c[0])
        out[code] = {
            "employee_code": code,
            "employee_id": str(winner["_id"]),
            "employee_name": winner["employee_name"],
            "team": winner["team"],
            "is_active": int(winner["active"]),
            "updated_at": ms(winner["updated_at"]),
            "is_deleted": int(all(c[1] for c in candidates)),
        }
    return out


def pipeline_state_rows(
    db: Database, employees: Mapping[str, Mapping[str, Any]], as_of: datetime
) -> dict[str, dict[str, Any]]:
    """file_id -> every column of `analytics.pipeline_state` at `as_of`; `employees` is
    `employee_dimension(...)`: a known assignee's name comes from it, else from the task."""
    names = {d["_id"]: d["employee_name"] for d in db.tasks.find({}, {"employee_name": 1})}
    out = {}
    for file_id, (stage, code, status, assigned_at, task_id) in current_task_per_file(db).items():
        known = employees.get(code)
        out[file_id] = {
            "file_id": file_id,
            "stage": stage,
            "stage_order": stage_order(stage),
            "is_known_stage": int(stage in STAGES),
            "status": status,
            "is_known_status": int(status in STATUSES),
            "employee_code": code,
            "employee_name": known["employee_name"] if known else names[ObjectId(task_id)],
            "is_known_employee": int(known is not None),
            "assigned_at": assigned_at,
            "task_id": task_id,
            "time_in_stage_seconds": age_seconds(assigned_at, as_of),
        }
    return out


def backlog_rows(
    state: Mapping[str, Mapping[str, Any]], as_of: datetime
) -> dict[tuple[str, str], dict[str, Any]]:
    """(stage, status) -> every column of `analytics.mart_backlog_by_stage` at `as_of`."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in state.values():
        groups[(row["stage"], row["status"])].append(row)
    as_of_ms = ms(as_of).replace(tzinfo=UTC).timestamp() * 1000
    out = {}
    for (stage, status), rows in groups.items():
        oldest = min(r["assigned_at"] for r in rows)
        mean_ms = sum(r["assigned_at"].replace(tzinfo=UTC).timestamp() * 1000 for r in rows)
        mean_ms /= len(rows)
        out[(stage, status)] = {
            "stage": stage,
            "stage_order": stage_order(stage),
            "status": status,
            "is_open": int(status in OPEN_STATUSES),
            "files": len(rows),
            "oldest_assigned_at": oldest,
            "max_time_in_stage_seconds": age_seconds(oldest, as_of),
            "avg_time_in_stage_seconds": (as_of_ms - mean_ms) / 1000,
        }
    return out


def workload_rows(
    state: Mapping[str, Mapping[str, Any]],
    employees: Mapping[str, Mapping[str, Any]],
    as_of: datetime,
) -> dict[str, dict[str, Any]]:
    """code -> every column of `analytics.mart_employee_workload` at `as_of`: every employee of
    the dimension (zero open tasks when idle), and each unknown code with open work (no name,
    team or flags: the dimension lacks it)."""
    open_files: dict[str, list[datetime]] = defaultdict(list)
    for row in state.values():
        if row["status"] in OPEN_STATUSES:
            open_files[row["employee_code"]].append(row["assigned_at"])
    out = {}
    for code in employees.keys() | open_files.keys():
        emp = employees.get(code)
        oldest = min(open_files[code]) if open_files.get(code) else None
        out[code] = {
            "employee_code": code,
            "employee_name": emp["employee_name"] if emp else "",
            "team": emp["team"] if emp else "",
            "is_active": emp["is_active"] if emp else 0,
            "is_deleted": emp["is_deleted"] if emp else 0,
            "is_known_employee": int(emp is not None),
            "open_tasks": len(open_files.get(code, [])),
            "oldest_open_assigned_at": oldest,
            "oldest_open_task_age_seconds": None if oldest is None else age_seconds(oldest, as_of),
        }
    return out


def file_ageing_rows(
    state: Mapping[str, Mapping[str, Any]], as_of: datetime
) -> dict[tuple[str, str], dict[str, Any]]:
    """(stage, bucket) -> every column of `analytics.mart_file_ageing` at `as_of`; finished
    files (last stage, done) no longer age and are left out."""
    groups: dict[tuple[str, str], list[tuple[int, Mapping[str, Any]]]] = defaultdict(list)
    for row in state.values():
        if row["stage"] == STAGES[-1] and row["status"] == "done":
            continue
        seconds = age_seconds(row["assigned_at"], as_of)
        groups[(row["stage"], age_bucket(seconds)[1])].append((seconds, row))
    out = {}
    for (stage, bucket), rows in groups.items():
        out[(stage, bucket)] = {
            "stage": stage,
            "stage_order": stage_order(stage),
            "age_bucket": bucket,
            "age_bucket_order": age_bucket(rows[0][0])[0],
            "files": len(rows),
            "open_files": sum(r["status"] in OPEN_STATUSES for _, r in rows),
            "max_time_in_stage_seconds": max(s for s, _ in rows),
        }
    return out


def throughput_rows(db: Database) -> dict[tuple[date, str], dict[str, Any]]:
    """(day, stage) -> every column of `analytics.mart_daily_throughput`."""
    return {
        (day, stage): {
            "day": day,
            "stage": stage,
            "stage_order": stage_order(stage),
            "tasks_assigned": assigned,
            "tasks_done": done,
            "tasks_rejected": rejected,
        }
        for (day, stage), (assigned, done, rejected) in throughput(db).items()
    }
