"""The initial snapshot by `_id` range (`loader.snapshot`) against the real servers: range
workers under a writer plus the follower from the stored resume point load exactly what
MongoDB holds; a killed worker resumes its range; ranges split ids of mixed BSON types; an
already loaded collection is refused."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId
from bson.datetime_ms import DatetimeMS
from clickhouse_connect.driver.client import Client
from loader_testlib import clickhouse_tasks, mongo_tasks, run_record
from pymongo.database import Database

from loader.clients import Clients
from loader.follower import follow_changes
from loader.mapping import id_to_str
from loader.schema import SNAPSHOT_RANGES, SOURCE_IDENTITY
from loader.settings import Settings
from loader.snapshot import (
    SnapshotRefused,
    load_plan,
    plan_snapshot,
    run_snapshot,
)
from loader.snapshot_ranges import RangeSpec, decode_id
from loader.sync import sync_collection
from loader.watermark import load_watermark, load_watermarks
from synthetic import seed


@pytest.fixture(autouse=True)
def first_load(settings: Settings, clickhouse_client: Client) -> None:
    """Never loaded: no recorded source identity, no snapshot plan of an earlier test."""
    clickhouse_client.command(f"TRUNCATE TABLE {SOURCE_IDENTITY.qualified}")
    clickhouse_client.command(f"TRUNCATE TABLE {SNAPSHOT_RANGES.qualified}")


def _now() -> DatetimeMS:
    return DatetimeMS(int(datetime.now(UTC).timestamp() * 1000))


def _task(i: int, **extra: Any) -> dict[str, Any]:
    at = DatetimeMS(1_700_000_000_000 + i * 1000)
    return {
        "file_id": f"F{i % 50:04d}",
        "stage": "intake",
        "employee_code": f"E{i % 7}",
        "employee_name": f"Employee {i % 7}",
        "status": "open",
        "assigned_at": at,
        "updated_at": at,
        **extra,
    }


def _range_ids(db: Database, plan: list[Any], k: int) -> list[Any]:
    """The ids of range k in MongoDB now, by the plan's bounds (index bounds, every type)."""
    st = plan[k]
    if st.empty:
        return []
    cursor = db.tasks.find({}, {"_id": 1}).hint([("_id", 1)])
    if st.lower:
        cursor = cursor.min([("_id", decode_id(st.lower))])
    if st.upper:
        cursor = cursor.max([("_id", decode_id(st.upper))])
    return [d["_id"] for d in cursor]


def _snapshot_rows(ch: Client, run_ids: list[str]) -> tuple[int, int]:
    """Rows the snapshot runs wrote, and their distinct ids (equal: no id read twice)."""
    rows = ch.query(
        "SELECT count(), uniqExact(_id) FROM raw.tasks WHERE _run_id IN {r:Array(String)}",
        parameters={"r": run_ids},
    ).result_rows[0]
    return int(rows[0]), int(rows[1])


def test_range_workers_under_a_writer_then_the_follower_load_exactly_what_mongo_holds(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 6_000, seed=51)
    ids = [d["_id"] for d in db.tasks.find({}, {"_id": 1})]
    rng = random.Random(7)
    stop = threading.Event()
    writes = {"insert": 0, "update": 0, "delete": 0}
    spans: dict[int, list[float]] = {}
    read_past: dict[int, Any] = {}  # range → an id it has stored, for a write after the read
    late_writes: list[Any] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            db.tasks.insert_one(_task(n, updated_at=_now()))
            writes["insert"] += 1
            victim = rng.choice(ids)
            db.tasks.update_one({"_id": victim}, {"$set": {"status": "w", "updated_at": _now()}})
            writes["update"] += 1
            if n % 5 == 0:
                gone = rng.choice(ids)
                if db.tasks.delete_one({"_id": gone}).deleted_count:
                    writes["delete"] += 1
            time.sleep(0.005)

    def after_batch(b: Any) -> None:
        spans.setdefault(b.spec.index, []).append(time.monotonic())
        if b.batch_no == 2 and b.spec.index not in read_past:
            # A write to a document its range has already stored: only the follower can
            # deliver it.
            read_past[b.spec.index] = b.last_id
            db.tasks.update_one(
                {"_id": b.last_id}, {"$set": {"status": "after-read", "updated_at": _now()}}
            )
            late_writes.append(b.last_id)

    writing = threading.Thread(target=writer)
    writing.start()
    try:
        results = run_snapshot(
            settings,
            "tasks",
            3,
            processes=False,
            batch_size=200,
            clients=clients,
            after_batch=after_batch,
        )
    finally:
        stop.set()
        writing.join()

    assert all(writes.values()), writes
    assert len(late_writes) == 3
    # The three workers ran at the same time: each stored a batch before any other finished.
    assert max(s[0] for s in spans.values()) < min(s[-1] for s in spans.values())
    # Each range loaded a share, and no id was read by two ranges.
    assert all(r.docs_read > 0 for r in results)
    written, distinct = _snapshot_rows(clickhouse_client, [r.run_id for r in results])
    assert written == distinct
    assert [run_record(clickhouse_client, r.run_id)["shard"] for r in results] == [
        "snapshot 0/3",
        "snapshot 1/3",
        "snapshot 2/3",
    ]
    # The snapshot alone misses the writes made after a range was read ...
    before = clickhouse_tasks(clickhouse_client)
    expected = mongo_tasks(db)
    missed = {i for i in expected if before.get(i) != expected[i]}
    assert {str(i) for i in late_writes} <= missed

    # ... which the follower replays from the resume point stored before the first read (5 s
    # idle: on a loaded 2-core machine its first batch can take longer than a second).
    follow_changes(settings, "tasks", clients=clients, all_changes=True, idle_timeout_s=5.0)

    assert clickhouse_tasks(clickhouse_client) == expected
    assert clickhouse_client.command(
        "SELECT count() FROM raw.tasks FINAL WHERE is_deleted = 0"
    ) == len(expected)
    # Without FINAL: the latest version of each id, by `_version`, is the same.
    live = clickhouse_client.command(
        "SELECT countIf(d = 0) FROM (SELECT argMax(is_deleted, _version) AS d FROM raw.tasks "
        "GROUP BY _id)"
    )
    assert live == len(expected)
    # The unsharded watermark is the snapshot's start minus the overlap.
    wm = load_watermark(clickhouse_client, "tasks")
    assert wm is not None
    assert wm.read_started_at_ms - wm.updated_at_ms == int(settings.overlap_seconds * 1000)


def test_a_worker_killed_mid_range_resumes_from_its_stored_progress(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 3_000, seed=52)
    batch = 100

    def crash_third_insert(spec: RangeSpec, n: int) -> None:
        if spec.index == 1 and n == 3:
            raise RuntimeError("injected: worker 1 dies before its third batch is stored")

    with pytest.raises(RuntimeError, match="injected"):
        run_snapshot(
            settings,
            "tasks",
            3,
            processes=False,
            batch_size=batch,
            clients=clients,
            before_insert=crash_third_insert,
        )
    plan = load_plan(clients, "tasks")
    assert plan[1].docs == 2 * batch and not plan[1].done
    assert load_watermarks(clickhouse_client, "tasks") == {}  # not finished: no watermark

    again = run_snapshot(settings, "tasks", 3, processes=False, batch_size=batch, clients=clients)

    in_range_1 = len(_range_ids(db, plan, 1))
    assert again[1].docs_read == in_range_1 - 2 * batch  # resumed, not reread from the start
    assert [r.docs_read for i, r in enumerate(again) if i != 1] == [0, 0]  # those were done
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)
    assert clickhouse_client.command("SELECT count() FROM raw.tasks") == len(mongo_tasks(db))
    assert load_watermark(clickhouse_client, "tasks") is not None


def test_a_delete_the_follower_replays_before_its_range_stores_the_document_stays_deleted(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 600, seed=53)
    deleted: list[Any] = []

    def delete_then_follow(spec: RangeSpec, n: int) -> None:
        if spec.index == 0 and n == 1:
            # Range 0 has read its first batch and not stored it: its first document is
            # deleted, and the follower replays the delete before the batch reaches raw.
            first = _range_ids(db, load_plan(clients, "tasks"), 0)[0]
            assert db.tasks.delete_one({"_id": first}).deleted_count == 1
            deleted.append(first)
            follow_changes(settings, "tasks", all_changes=True, idle_timeout_s=1.0)

    run_snapshot(
        settings,
        "tasks",
        2,
        processes=False,
        batch_size=100,
        clients=clients,
        before_insert=delete_then_follow,
    )

    assert deleted, "the delete was not made"
    assert id_to_str(deleted[0]) not in clickhouse_tasks(clickhouse_client)
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


MIXED_IDS: list[Any] = (
    list(range(40))
    + [f"task-{i:03d}" for i in range(40)]
    + [ObjectId() for _ in range(40)]
    + [1.5, -3, "", {"k": 1}, True, DatetimeMS(1_600_000_000_000)]
)


def test_ranges_split_ids_of_mixed_types_and_load_every_one(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    db.tasks.insert_many([_task(i, _id=v) for i, v in enumerate(MIXED_IDS)])

    results = run_snapshot(settings, "tasks", 3, processes=False, batch_size=7, clients=clients)

    plan = load_plan(clients, "tasks")
    shares = [_range_ids(db, plan, k) for k in range(3)]
    # A split point falls among the types: some range holds ids of two BSON types.
    assert any(len({type(i) for i in share}) > 1 for share in shares)
    assert sum(len(s) for s in shares) == len(MIXED_IDS)
    assert [r.docs_read for r in results] == [len(s) for s in shares]
    # ObjectIds load as rows; other ids are rejected with their reason (as the sync does):
    # each id is accounted for exactly once.
    loaded = [r[0] for r in clickhouse_client.query("SELECT _id FROM raw.tasks").result_rows]
    rejected = [r[0] for r in clickhouse_client.query("SELECT _id FROM raw.rejects").result_rows]
    assert sorted(loaded + rejected) == sorted(id_to_str(i) for i in MIXED_IDS)
    assert set(loaded) == {str(i) for i in MIXED_IDS if isinstance(i, ObjectId)}


def test_documents_without_a_usable_updated_at_are_rejected_with_their_reason(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    db.tasks.insert_many([_task(i) for i in range(30)])
    db.tasks.insert_one(_task(99, updated_at="yesterday"))
    no_date = _task(98)
    del no_date["updated_at"]
    db.tasks.insert_one(no_date)

    results = run_snapshot(settings, "tasks", 2, processes=False, batch_size=5, clients=clients)

    assert sum(r.rejects for r in results) == 2
    assert sum(r.rows_written for r in results) == 30
    reasons = [r[0] for r in clickhouse_client.query("SELECT reason FROM raw.rejects").result_rows]
    assert len(reasons) == 2 and all("updated_at" in r for r in reasons)


def test_a_loaded_collection_is_refused_naming_sync_and_reload(
    settings: Settings, clients: Clients, db: Database
) -> None:
    seed(db, 200, seed=53)
    sync_collection(settings, "tasks", clients=clients)

    with pytest.raises(SnapshotRefused, match="already loaded"):
        plan_snapshot(settings, "tasks", 2, clients=clients)
    out = subprocess.run(
        [sys.executable, "-m", "loader", "snapshot", "--collection", "tasks", "--workers", "2"],
        env=os.environ | {"MONGO_DB": settings.mongo_db},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert out.returncode != 0
    said = " ".join((out.stdout + out.stderr).split())
    assert "tasks is already loaded" in said
    assert "python -m loader sync --collection tasks" in said
    assert "--reload" in said


def test_reload_empties_the_table_and_loads_again_in_processes(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 500, seed=54)
    sync_collection(settings, "tasks", clients=clients)
    db.tasks.delete_many({"_id": {"$in": [d["_id"] for d in db.tasks.find().limit(10)]}})

    out = subprocess.run(
        [sys.executable, "-m", "loader", "snapshot", "--workers", "2", "--reload"],
        env=os.environ | {"MONGO_DB": settings.mongo_db},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert out.returncode == 0, out.stdout + out.stderr
    assert "snapshot complete" in out.stdout
    # The deleted documents' rows went with the emptied table.
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)
    assert clickhouse_client.command("SELECT count() FROM raw.tasks") == 490


def test_a_plan_then_range_workers_in_processes_of_their_own_load_everything(
    settings: Settings, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 1_500, seed=55)
    env = os.environ | {"MONGO_DB": settings.mongo_db}
    base = [sys.executable, "-m", "loader", "snapshot", "--collection", "tasks"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=300)

    planned = run("--workers", "2", "--plan")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "--range k/2" in " ".join(planned.stdout.split())
    assert load_watermarks(clickhouse_client, "tasks") == {}
    workers = [
        subprocess.Popen(
            [*base, "--range", f"{k}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for k in range(2)
    ]
    codes = [w.wait(300) for w in workers]

    assert codes == [0, 0]
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)
    assert load_watermark(clickhouse_client, "tasks") is not None  # the last one wrote it
    refused = run("--range", "0/3")
    assert refused.returncode != 0
    assert "--plan" in " ".join((refused.stdout + refused.stderr).split())
