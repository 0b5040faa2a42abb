"""Write → `pipeline_state` latency under a steady writer: the `freshness` group.

While the hot path runs (the change-stream follower, `python -m loader watch --all-changes`, as a
separate process), a writer keeps `rate` task writes per second going for `seconds`: status
changes, reassignments, new tasks and a few deletes, spread over files of the dataset. Among
them, probes: every `1 / probes_per_s` seconds one write on a file set aside for probing, whose
effect on that file's row of `analytics.pipeline_state` is known in advance. A probe file goes
through a cycle of four writes, each issued once the previous one is visible:

1. a new task in the file, assigned now: it becomes the file's current task;
2. a status change of that task;
3. its reassignment to another employee;
4. its deletion: the file's previous current task is current again (a retraction, which the
   materialized view alone cannot express; the follower settles it).

A poller reads the outstanding probe files' rows every `poll_s` and records, per probe, the time
from the write's acknowledgement by MongoDB to the sending of the first read that shows it: a
read answers from the parts the table has when it starts, so what it shows was visible by then;
its own run time (the reader's cost, reported as `poll_ms`) is not the pipeline's. The poll
interval bounds the resolution (`poll_s`, 100 ms by default, adds about half of it on average);
each poll is a read of `pipeline_state` that competes with the follower for the machine's cores
(the embedded engine runs the statements of different connections side by side, up to its
`max_concurrent_queries`).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo import DeleteOne, InsertOne, UpdateOne

STATUSES = ("assigned", "in_progress", "done", "rejected")


@dataclass
class Probe:
    file_id: str
    previous_task: str  # the file's current task before the cycle
    task: str = ""  # the probe's own task (step 1)
    employee: str = ""  # its assignee
    step: int = 0  # next step to issue (0..3); 4 = cycle done
    expect: dict[str, str] = field(default_factory=dict)  # column -> value once visible
    written_at: float = 0.0  # time.time() when MongoDB acknowledged the write
    kind: str = ""


@dataclass
class Outcome:
    latencies_s: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    writes: int = 0
    seconds: float = 0.0
    unseen: int = 0  # probes not visible within the timeout
    poll_s: list[float] = field(default_factory=list)  # each poll's run time (send to answer)
    deferred: int = 0  # probe ticks skipped because every probe file was still outstanding
    mix: Counter[str] = field(default_factory=Counter)


def _now() -> datetime:
    return datetime.now(UTC)


def run(
    mongo_db: Any,
    clickhouse: Any,
    *,
    rate: float,
    seconds: float,
    probes_per_s: float = 10.0,
    poll_s: float = 0.1,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> Outcome:
    """Write at `rate` writes/s for `seconds` and measure the probes (see the module doc)."""
    rng = random.Random(seed)
    # Files and their current tasks, as pipeline_state shows them now; probes and background
    # writes use disjoint files, so only probes decide what a probe file shows.
    sample = clickhouse.query(
        "SELECT file_id, task_id FROM analytics.pipeline_state "
        "ORDER BY cityHash64(file_id, {s:UInt64}) LIMIT 20000",
        parameters={"s": seed},
    ).result_rows
    if len(sample) < 40:
        raise RuntimeError("freshness needs a built dataset (pipeline_state has too few files)")
    # Few probe files, so that each goes through its whole cycle (insert, status, reassign,
    # delete) several times in a run: two seconds' worth of probes, plus a margin. A tick that
    # finds every probe file outstanding (latency above ~2 s) is deferred, and counted.
    n_probe = max(8, min(len(sample) // 4, int(probes_per_s * 2) + 4))
    probe_files = sample[:n_probe]
    background = [t for _, t in sample[n_probe:]]
    employees = [
        (e["employee_code"], e["employee_name"])
        for e in mongo_db.employee.find({}, {"employee_code": 1, "employee_name": 1}).limit(500)
    ]
    probes = [Probe(f, t) for f, t in probe_files]
    idle = list(range(len(probes)))
    outstanding: dict[int, Probe] = {}
    lock = threading.Lock()
    out = Outcome()
    stop = threading.Event()
    poll_errors: list[BaseException] = []

    def poll() -> None:
        try:
            while not stop.is_set() or outstanding:
                with lock:
                    waiting = dict(outstanding)
                if waiting:
                    files = sorted({p.file_id for p in waiting.values()})
                    sent_at = time.time()  # the answer shows the state when the read started
                    rows = clickhouse.query(
                        "SELECT file_id, task_id, status, employee_code "
                        "FROM analytics.pipeline_state WHERE file_id IN {f:Array(String)}",
                        parameters={"f": files},
                    ).result_rows
                    out.poll_s.append(time.time() - sent_at)
                    shown = {
                        r[0]: {"task_id": r[1], "status": r[2], "employee_code": r[3]} for r in rows
                    }
                    with lock:
                        for i, p in waiting.items():  # written before the read was sent
                            row = shown.get(p.file_id, {})
                            if all(row.get(k) == v for k, v in p.expect.items()):
                                out.latencies_s.append(sent_at - p.written_at)
                                out.kinds.append(p.kind)
                                del outstanding[i]
                                idle.append(i)
                            elif sent_at - p.written_at > timeout_s:
                                out.unseen += 1
                                del outstanding[i]
                if stop.is_set() and not outstanding:
                    break
                time.sleep(poll_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            poll_errors.append(exc)

    def probe_write(p: Probe) -> None:
        code, name = rng.choice(employees)
        if p.step == 0:
            p.task = str(ObjectId())
            now = _now()
            mongo_db.tasks.insert_one(
                {
                    "_id": ObjectId(p.task),
                    "file_id": p.file_id,
                    "stage": "review",
                    "employee_code": code,
                    "employee_name": name,
                    "status": "assigned",
                    "assigned_at": now,
                    "updated_at": now,
                }
            )
            p.employee = code
            p.kind, p.expect = "insert", {"task_id": p.task}
        elif p.step == 1:
            mongo_db.tasks.update_one(
                {"_id": ObjectId(p.task)},
                {"$set": {"status": "in_progress", "updated_at": _now()}},
            )
            p.kind, p.expect = "status", {"task_id": p.task, "status": "in_progress"}
        elif p.step == 2:
            while code == p.employee and len(employees) > 1:
                code, name = rng.choice(employees)
            p.employee = code
            mongo_db.tasks.update_one(
                {"_id": ObjectId(p.task)},
                {"$set": {"employee_code": code, "employee_name": name, "updated_at": _now()}},
            )
            p.kind, p.expect = "reassign", {"task_id": p.task, "employee_code": code}
        else:
            mongo_db.tasks.delete_one({"_id": ObjectId(p.task)})
            p.kind, p.expect = "delete", {"task_id": p.previous_task}
        p.written_at = time.time()
        p.step = (p.step + 1) % 4

    inserted: list[ObjectId] = []

    def background_op() -> Any:
        roll = rng.random()
        now = _now()
        if roll < 0.02 and inserted:  # a few deletes, of tasks this writer created
            out.mix["delete"] += 1
            return DeleteOne({"_id": inserted.pop(rng.randrange(len(inserted)))})
        if roll < 0.17:
            out.mix["insert"] += 1
            code, name = rng.choice(employees)
            oid = ObjectId()
            inserted.append(oid)
            return InsertOne(
                {
                    "_id": oid,
                    "file_id": f"BENCH-{rng.randrange(10**9):09d}",
                    "stage": "intake",
                    "employee_code": code,
                    "employee_name": name,
                    "status": "assigned",
                    "assigned_at": now,
                    "updated_at": now,
                }
            )
        task = ObjectId(rng.choice(background))
        if roll < 0.37:
            out.mix["reassign"] += 1
            code, name = rng.choice(employees)
            change = {"employee_code": code, "employee_name": name, "updated_at": now}
        else:
            out.mix["status"] += 1
            change = {"status": rng.choice(STATUSES), "updated_at": now}
        return UpdateOne({"_id": task}, {"$set": change})

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.monotonic()
    next_probe = t0
    try:
        while (elapsed := time.monotonic() - t0) < seconds and not poll_errors:
            due = int(rate * elapsed) - out.writes
            if due > 0:
                mongo_db.tasks.bulk_write([background_op() for _ in range(due)], ordered=False)
                out.writes += due
            if time.monotonic() >= next_probe:
                with lock:
                    i = idle.pop(0) if idle else None
                if i is None:
                    out.deferred += 1
                else:
                    p = probes[i]
                    probe_write(p)
                    out.writes += 1
                    with lock:
                        outstanding[i] = p
                next_probe += 1 / probes_per_s
            time.sleep(0.005)
        out.seconds = time.monotonic() - t0
    finally:
        stop.set()
        poller.join(timeout=timeout_s + 5)
    if poll_errors:
        raise poll_errors[0]
    return out
