"""A deterministic synthetic source that looks like the real one.

Employees work on files; every file moves through `STAGES` in order and has one task document per
stage it reached. Reassignments and status changes update tasks in place and bump `updated_at`.
Everything derives from `seed` (including the ObjectIds), so two runs with the same arguments give
byte-identical collections. Documents are generated lazily and inserted in batches, so any scale
from 1k to 10M tasks runs in constant memory.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from bson.datetime_ms import DatetimeMS
from pymongo import UpdateOne
from pymongo.database import Database
from pymongo.errors import OperationFailure

STAGES: tuple[str, ...] = (
    "intake",
    "review",
    "processing",
    "quality_check",
    "approval",
    "delivered",
)
STATUSES: tuple[str, ...] = ("assigned", "in_progress", "done", "rejected")
TEAMS: tuple[str, ...] = ("north", "south", "east", "west", "night-shift", "équipe-b")
TASKS = "tasks"
EMPLOYEES = "employee"
META = "_synthetic"  # one document describing the seeded dataset, used by `mutate`

# The default dataset ends here (not at "now") so that it is reproducible and lies in the past.
DEFAULT_END = datetime(2026, 1, 1, tzinfo=UTC)

_FIRST = (
    "Ana",
    "Bruno",
    "Chloé",
    "Dmitri",
    "Eun-ji",
    "Farah",
    "Gustav",
    "Håkon",
    "Ines",
    "Jörg",
    "Kofi",
    "Łukasz",
    "Maëlys",
    "Nuno",
    "Oğuz",
    "Priya",
    "Quentin",
    "Renée",
    "Søren",
    "Tomás",
    "Ulla",
    "Vũ",
    "Wen",
    "Xochitl",
    "Yusuf",
    "Zoë",
    "美咲",
    "Алексей",
)
_LAST = (
    "Almeida",
    "Brandt",
    "Çelik",
    "Dubois",
    "Eriksson",
    "Fernández",
    "García",
    "Horváth",
    "Ivanova",
    "Jensen",
    "Kowalski",
    "López",
    "Müller",
    "Nguyễn",
    "O'Brien",
    "Petrović",
    "Quispe",
    "Rossi",
    "Schäfer",
    "Tanaka",
    "Ueda",
    "Varga",
    "Wójcik",
    "Yılmaz",
    "Zhang",
    "山田",
)

# Malformed kinds. All but `non_ascii` must be rejected by the loader; `non_ascii` is unusual but
# valid text that must load unchanged.
MALFORMED_KINDS: tuple[str, ...] = (
    "missing_file_id",
    "missing_updated_at",
    "string_updated_at",
    "string_assigned_at",
    "wrong_type_file_id",
    "nested_junk",
    "long_string",
    "null_status",
    "date_out_of_range",
    "nul_in_string",
    "non_ascii",
)
REJECTED_KINDS: frozenset[str] = frozenset(MALFORMED_KINDS) - {"non_ascii"}
LONG_STRING_CHARS = 70_000  # over the loader's default 65,536-character limit


@dataclass(frozen=True)
class SeedResult:
    tasks: int
    employees: int
    files: int
    malformed: dict[str, int] = field(default_factory=dict)

    @property
    def expected_rejects(self) -> int:
        return sum(n for kind, n in self.malformed.items() if kind in REJECTED_KINDS)


@dataclass(frozen=True)
class MutateResult:
    updated: int
    inserted: int

    @property
    def changed(self) -> int:
        return self.updated + self.inserted


def _seed_bytes(seed: int, kind: int) -> bytes:
    return hashlib.blake2b(struct.pack(">qB", seed, kind), digest_size=5).digest()


def make_object_id(seed: int, kind: int, seq: int, at: datetime) -> ObjectId:
    """An ObjectId that is a pure function of its inputs (timestamp = `at`, as Mongo would do)."""
    ts = max(0, min(int(at.timestamp()), 2**32 - 1))
    return ObjectId(struct.pack(">I", ts) + _seed_bytes(seed, kind) + (seq % 2**24).to_bytes(3))


def new_stage_id(seed: int, now: datetime, n: int) -> ObjectId:
    """Id of the `n`-th task a `mutate(seed=seed, now=now)` call opens: unique within the call
    (`n` is the 3-byte counter) and, through a hash of `(seed, now)` in the 5 middle bytes,
    distinct from other calls' and from seeded ids (drawing the counter at random made ids
    repeat at 1M tasks)."""
    if not 0 <= n < 2**24:
        raise ValueError(f"mutate opens at most {2**24} tasks per call, got index {n}")
    ts = max(0, min(int(now.timestamp()), 2**32 - 1))
    key = struct.pack(">qq", seed, int(now.timestamp() * 1000))
    middle = hashlib.blake2b(key, digest_size=5, person=b"mutate").digest()
    return ObjectId(struct.pack(">I", ts) + middle + n.to_bytes(3))


def _employee_count(n_tasks: int) -> int:
    return max(20, min(5_000, n_tasks // 500))


def _employees(seed: int, n: int, end: datetime, days: int) -> list[dict[str, Any]]:
    rng = random.Random(f"employees-{seed}")
    out = []
    for i in range(n):
        created = end - timedelta(days=days + 30, seconds=rng.randrange(86_400 * 30))
        out.append(
            {
                "_id": make_object_id(seed, 1, i, created),
                "employee_code": f"E{i:05d}",
                "employee_name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                "team": rng.choice(TEAMS),
                "active": rng.random() > 0.1,
                "updated_at": created,
            }
        )
    return out


def _ms(dt: datetime) -> datetime:
    """Truncate to milliseconds: Mongo stores dates with millisecond precision."""
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def _iter_tasks(
    seed: int, n_tasks: int, employees: list[dict[str, Any]], end: datetime, days: int
) -> Iterator[dict[str, Any]]:
    rng = random.Random(f"tasks-{seed}")
    active = [e for e in employees if e["active"]] or employees
    span = days * 86_400.0
    seq = 0
    file_no = 0
    while seq < n_tasks:
        file_id = f"F{seed}-{file_no:08d}"
        file_no += 1
        # Most files are still somewhere in the middle of the pipeline.
        reached = min(len(STAGES), 1 + int(rng.expovariate(0.45)))
        t = end - timedelta(seconds=rng.random() * span)
        for stage_no in range(reached):
            if seq >= n_tasks:
                break
            emp = rng.choice(active)
            assigned_at = _ms(min(t, end))
            last = stage_no == reached - 1
            if not last:
                status = "done"
                work = timedelta(seconds=rng.uniform(600, 3 * 86_400))
            elif STAGES[stage_no] == "delivered":
                status = "done"
                work = timedelta(seconds=rng.uniform(60, 3_600))
            else:
                status = rng.choices(STATUSES, weights=(4, 4, 1, 1))[0]
                work = timedelta(seconds=rng.uniform(0, 86_400))
            updated_at = _ms(min(assigned_at + work, end))
            yield {
                "_id": make_object_id(seed, 0, seq, assigned_at),
                "file_id": file_id,
                "stage": STAGES[stage_no],
                "employee_code": emp["employee_code"],
                "employee_name": emp["employee_name"],
                "status": status,
                "assigned_at": assigned_at,
                "updated_at": updated_at,
            }
            seq += 1
            t = updated_at + timedelta(seconds=rng.uniform(0, 3_600))


def corrupt(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    """Turn a good task document into a malformed one of the given kind (in place)."""
    if kind == "missing_file_id":
        del doc["file_id"]
    elif kind == "missing_updated_at":
        del doc["updated_at"]
    elif kind == "string_updated_at":
        doc["updated_at"] = doc["updated_at"].isoformat()
    elif kind == "string_assigned_at":
        doc["assigned_at"] = "31/02/2025 25:61"
    elif kind == "wrong_type_file_id":
        doc["file_id"] = int(doc["_id"].binary[-3:].hex(), 16)
    elif kind == "nested_junk":
        doc["employee_name"] = {"first": "Ana", "junk": [1, {"x": None}, [[]]]}
    elif kind == "long_string":
        doc["employee_name"] = "long " + "x" * LONG_STRING_CHARS
    elif kind == "null_status":
        doc["status"] = None
    elif kind == "date_out_of_range":
        # Year 1800: a valid BSON date that ClickHouse DateTime64 cannot hold.
        doc["assigned_at"] = DatetimeMS(-5_364_662_400_000)
    elif kind == "nul_in_string":
        doc["file_id"] = doc["file_id"] + "\x00tail"
    elif kind == "non_ascii":
        doc["file_id"] = doc["file_id"] + "-Ωmega-文件-ü"
        doc["employee_name"] = "Zoë Ñúñez-王 😀"
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; choose from {MALFORMED_KINDS}")
    return doc


AUTHENTICATION_FAILED = 18  # MongoDB's error code


class NotAnEmbeddedServer(RuntimeError):
    """`seed` would drop collections on a MongoDB that the embedded stack did not start."""

    def __init__(self, server: str, database: str, reason: str) -> None:
        self.server, self.database, self.reason = server, database, reason
        super().__init__(
            f"refusing to drop {TASKS}, {EMPLOYEES} and {META} in database {database!r} on the "
            f"MongoDB at {server}: {reason}. The synthetic seed replaces those collections, so it "
            "does that only on a server the embedded stack started (`python -m devstack up` "
            "marks it). Pass force=True if that server holds nothing you need, or drop=False "
            "to add the synthetic data without dropping anything."
        )


def _server_address(db: Database) -> str:
    try:
        host, port = db.client.address or ("?", 0)
        return f"{host}:{port}"
    except Exception:  # several mongos: name them all
        return ", ".join(f"{host}:{port}" for host, port in sorted(db.client.nodes)) or "?"


def ensure_embedded_server(db: Database) -> dict[str, Any]:
    """The embedded stack's marker on `db`'s server, or NotAnEmbeddedServer.

    `python -m devstack up` writes the marker into the node's `local` database at every start
    (`devstack.mongo.embedded_marker`); a server it did not start never has it."""
    from devstack.mongo import MARKER_COLLECTION, MARKER_DB, MARKER_ID, embedded_marker

    where = f"{MARKER_DB}.{MARKER_COLLECTION} {{_id: {MARKER_ID!r}}}"
    try:
        marker = embedded_marker(db.client)
    except OperationFailure as exc:  # e.g. not authorized to read `local`
        if exc.code == AUTHENTICATION_FAILED:
            raise  # the credentials are the problem to report, not the marker
        raise NotAnEmbeddedServer(
            _server_address(db), db.name, f"could not read its embedded-stack marker {where}: {exc}"
        ) from exc
    if marker is None:
        raise NotAnEmbeddedServer(
            _server_address(db),
            db.name,
            f"the embedded stack did not start that server (it has no marker {where})",
        )
    return marker


def seed(
    db: Database,
    n_tasks: int,
    *,
    seed: int = 0,
    malformed_ratio: float = 0.0,
    batch: int = 10_000,
    end: datetime | None = None,
    days: int = 90,
    drop: bool = True,
    force: bool = False,
) -> SeedResult:
    """Fill `db.tasks` and `db.employee` with a deterministic dataset of `n_tasks` tasks.

    `malformed_ratio` of the tasks are corrupted with one of `MALFORMED_KINDS` (chosen
    deterministically). `end` is the latest timestamp in the data (default `DEFAULT_END`); pass
    the current time to get data that looks live. With `drop`, existing collections are replaced,
    and only on a server the embedded stack started (else NotAnEmbeddedServer) unless `force`.
    """
    if not 0 <= malformed_ratio <= 1:
        raise ValueError("malformed_ratio must be between 0 and 1")
    end = _ms(end or DEFAULT_END)
    if drop and not force:
        ensure_embedded_server(db)
    if drop:
        for name in (TASKS, EMPLOYEES, META):
            db.drop_collection(name)
    employees = _employees(seed, _employee_count(n_tasks), end, days)
    db[EMPLOYEES].insert_many(employees)

    rng = random.Random(f"malformed-{seed}")
    malformed: Counter[str] = Counter()
    buf: list[dict[str, Any]] = []
    last_file = ""
    n_files = 0
    for doc in _iter_tasks(seed, n_tasks, employees, end, days):
        if doc["file_id"] != last_file:
            last_file = doc["file_id"]
            n_files += 1
        if malformed_ratio and rng.random() < malformed_ratio:
            kind = rng.choice(MALFORMED_KINDS)
            corrupt(doc, kind)
            malformed[kind] += 1
        buf.append(doc)
        if len(buf) >= batch:
            db[TASKS].insert_many(buf, ordered=False)
            buf = []
    if buf:
        db[TASKS].insert_many(buf, ordered=False)
    # The real application looks tasks up by file; `mutate` does too.
    db[TASKS].create_index("file_id")
    db[META].replace_one(
        {"_id": "dataset"},
        {"_id": "dataset", "seed": seed, "tasks": n_tasks, "files": n_files, "end": end},
        upsert=True,
    )
    return SeedResult(
        tasks=n_tasks, employees=len(employees), files=n_files, malformed=dict(malformed)
    )


def _next_status(rng: random.Random, status: str) -> str:
    return {
        "assigned": "in_progress",
        "in_progress": rng.choice(("done", "done", "rejected")),
        "rejected": "in_progress",
    }.get(status, "done")


def mutate(
    db: Database,
    count: int | None = None,
    *,
    fraction: float | None = None,
    seed: int = 0,
    now: datetime | None = None,
    new_stages: bool = True,
) -> MutateResult:
    """Change `count` tasks (or `fraction` of all tasks) the way the real system does.

    Each picked task is either reassigned to another employee or moved to its next status, with
    `updated_at` set to `now` (default: the current time). When `new_stages` is true, a task
    that becomes `done` opens the file's next stage as a new task document. Deterministic for a
    given dataset, `seed` and `now`.
    """
    if (count is None) == (fraction is None):
        raise ValueError("pass exactly one of count or fraction")
    now = _ms(now or datetime.now(UTC))
    meta = db[META].find_one({"_id": "dataset"})
    if meta is None:
        raise RuntimeError("mutate needs a dataset made by synthetic.seed (no _synthetic)")
    n_files = int(meta["files"])
    if count is None:
        count = round(db[TASKS].estimated_document_count() * float(fraction or 0))
    count = min(count, n_files)
    if count <= 0:
        return MutateResult(0, 0)
    rng = random.Random(f"mutate-{seed}-{now.isoformat()}")
    employees = list(
        db[EMPLOYEES].find({"active": True}, {"employee_code": 1, "employee_name": 1}).sort("_id")
    )
    files = [f"F{meta['seed']}-{n:08d}" for n in sorted(rng.sample(range(n_files), count))]
    picked = _current_tasks(db, files)
    ops: list[UpdateOne] = []
    inserts: list[dict[str, Any]] = []
    for task in picked:
        status = task.get("status")
        if rng.random() < 0.3 and employees:
            emp = rng.choice(employees)
            change = {"employee_code": emp["employee_code"], "employee_name": emp["employee_name"]}
        else:
            change = {"status": _next_status(rng, status if isinstance(status, str) else "")}
        change["updated_at"] = now
        ops.append(UpdateOne({"_id": task["_id"]}, {"$set": change}))
        stage = task.get("stage")
        if new_stages and change.get("status") == "done" and stage in STAGES[:-1] and employees:
            emp = rng.choice(employees)
            inserts.append(
                {
                    "_id": new_stage_id(seed, now, len(inserts)),
                    "file_id": task.get("file_id"),
                    "stage": STAGES[STAGES.index(stage) + 1],
                    "employee_code": emp["employee_code"],
                    "employee_name": emp["employee_name"],
                    "status": "assigned",
                    "assigned_at": now,
                    "updated_at": now,
                }
            )
    if ops:
        db[TASKS].bulk_write(ops, ordered=False)
    if inserts:
        db[TASKS].insert_many(inserts, ordered=False)
    return MutateResult(updated=len(ops), inserted=len(inserts))


def _current_tasks(db: Database, files: list[str]) -> list[dict[str, Any]]:
    """The current (latest-stage) task of each file, in file order."""
    latest: dict[str, dict[str, Any]] = {}
    proj = {"_id": 1, "status": 1, "stage": 1, "file_id": 1}
    for doc in db[TASKS].find({"file_id": {"$in": files}}, proj).sort("_id", 1):
        stage = doc.get("stage")
        rank = STAGES.index(stage) if stage in STAGES else -1
        cur = latest.get(doc["file_id"])
        if cur is None or rank >= (
            STAGES.index(cur["stage"]) if cur.get("stage") in STAGES else -1
        ):
            latest[doc["file_id"]] = doc
    return [latest[f] for f in files if f in latest]


def activity(
    db: Database,
    *,
    seed: int = 0,
    per_tick: int = 100,
    interval_s: float = 1.0,
    ticks: int | None = None,
    on_tick: Callable[[int, MutateResult], None] | None = None,
) -> int:
    """Keep mutating a running dataset: `per_tick` changes every `interval_s` seconds.

    Runs `ticks` times (forever when None; stop with Ctrl-C). Returns the number of changes made.
    """
    done = 0
    tick = 0
    while ticks is None or tick < ticks:
        result = mutate(db, per_tick, seed=seed + tick)
        done += result.changed
        if on_tick:
            on_tick(tick, result)
        tick += 1
        if ticks is None or tick < ticks:
            time.sleep(interval_s)
    return done
