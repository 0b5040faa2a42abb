"""Loader shards (`--shard I/N`) against the real servers: the shard filter partitions every kind
of `_id`, reads off the watermark index, and N workers running at once under a writer load
exactly what MongoDB holds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from bson import Binary, Decimal128, Int64, ObjectId
from bson.datetime_ms import DatetimeMS
from clickhouse_connect.driver.client import Client
from loader_testlib import clickhouse_tasks, mongo_tasks, run_record
from pymongo.database import Database

from loader.changes import has_changes
from loader.clients import Clients
from loader.schema import SOURCE_IDENTITY
from loader.settings import Settings
from loader.shards import Shard
from loader.sync import WATERMARK_INDEX_NAME, SyncResult, sync_collection, watermark_range
from loader.watermark import ReadBounds, load_watermarks
from synthetic import mutate, seed


@pytest.fixture(autouse=True)
def first_load(settings: Settings, clickhouse_client: Client) -> None:
    """The warehouse never loaded these collections: no recorded source identity (the
    session's earlier tests loaded same-named collections that are gone now, which shard
    workers refuse to reload, see `sync_collection`)."""
    clickhouse_client.command(f"TRUNCATE TABLE {SOURCE_IDENTITY.qualified}")


ODD_IDS: list[Any] = [
    ObjectId(),
    "",
    "a",
    "task-000123",
    "ünïcødé-ключ",
    0,
    -7,
    2**31 - 1,
    Int64(-(2**63)),
    Int64(2**63 - 1),
    1.5,
    -0.25,
    float("nan"),
    Decimal128(Decimal("12345.678")),
    True,
    DatetimeMS(1_700_000_000_000),
    Binary(b"\x00\x01\x02"),
    {"a": 1, "b": "x"},
    None,
]


def _ids_of(db: Database, shard: Shard) -> set[str]:
    return {repr(d["_id"]) for d in db.odd.find(shard.mongo_filter(), {"_id": 1})}


@pytest.mark.parametrize("count", [2, 3, 4])
def test_every_kind_of_id_lands_in_exactly_one_shard(db: Database, count: int) -> None:
    db.odd.insert_many([{"_id": i} for i in ODD_IDS] + [{"_id": ObjectId()} for _ in range(64)])
    everything = {repr(d["_id"]) for d in db.odd.find({}, {"_id": 1})}

    shares = [_ids_of(db, Shard(i, count)) for i in range(count)]

    assert sum(len(s) for s in shares) == len(everything)  # no id in two shards
    assert set().union(*shares) == everything  # no id in none
    assert shares == [_ids_of(db, Shard(i, count)) for i in range(count)]  # same every time
    assert all(len(s) >= 64 // count // 2 for s in shares)  # ObjectIds spread over all


def test_a_shard_read_scans_the_watermark_index(
    settings: Settings, clients: Clients, db: Database
) -> None:
    seed(db, 200, seed=5)
    sync_collection(settings, "tasks", clients=clients)  # builds the index
    bounds = ReadBounds(1_700_000_000_000, ObjectId(), 1_900_000_000_000)

    plan = str(watermark_range(db.tasks, bounds, {"_id": 1}, shard=Shard(1, 4)).explain())

    assert "IXSCAN" in plan and WATERMARK_INDEX_NAME in plan
    assert "COLLSCAN" not in plan


def _shard_ids_in_mongo(db: Database, shard: Shard) -> set[str]:
    return {str(d["_id"]) for d in db.tasks.find(shard.mongo_filter(), {"_id": 1})}


def test_four_shard_workers_under_a_writer_load_exactly_what_mongo_holds(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 6_000, seed=31)
    shards = [Shard(i, 4) for i in range(4)]
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        n = 0
        while not stop.is_set():
            n += 1
            writes += mutate(db, 40, seed=1000 + n).changed
            time.sleep(0.02)

    spans: dict[Shard, list[tuple[float, float]]] = {s: [] for s in shards}
    results: dict[Shard, list[SyncResult]] = {s: [] for s in shards}
    barrier = threading.Barrier(len(shards))
    errors: list[BaseException] = []

    def worker(shard: Shard, passes: int) -> None:
        try:
            barrier.wait()
            for _ in range(passes):
                began = time.monotonic()
                results[shard].append(
                    sync_collection(settings, "tasks", clients=clients, batch_size=250, shard=shard)
                )
                spans[shard].append((began, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - raised in the test thread below
            errors.append(exc)

    def run_workers(passes: int) -> None:
        threads = [threading.Thread(target=worker, args=(s, passes)) for s in shards]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        if errors:
            raise errors[0]

    writing = threading.Thread(target=writer)
    writing.start()
    try:
        run_workers(passes=3)
    finally:
        stop.set()
        writing.join()
    # Quiescence: one more pass each, after the writer stopped.
    run_workers(passes=1)

    assert writes > 0
    # The first passes really ran at the same time.
    firsts = [spans[s][0] for s in shards]
    assert max(b for b, _ in firsts) < min(e for _, e in firsts)
    # ClickHouse holds exactly MongoDB: no lost row, no extra id, no duplicate after dedupe.
    expected = mongo_tasks(db)
    assert clickhouse_tasks(clickhouse_client) == expected
    assert clickhouse_client.command("SELECT count() FROM raw.tasks FINAL") == len(expected)
    assert clickhouse_client.command("SELECT uniqExact(_id) FROM raw.tasks") == len(expected)
    # Each shard loaded a non-empty share, and only its own ids (so the shares are disjoint).
    for shard in shards:
        run_ids = [r.run_id for r in results[shard]]
        loaded = {
            row[0]
            for row in clickhouse_client.query(
                "SELECT DISTINCT _id FROM raw.tasks WHERE _run_id IN {r:Array(String)}",
                parameters={"r": run_ids},
            ).result_rows
        }
        assert loaded, f"shard {shard} loaded nothing"
        assert loaded <= _shard_ids_in_mongo(db, shard), f"shard {shard} loaded another's ids"
        assert run_record(clickhouse_client, run_ids[0])["shard"] == str(shard)


def test_a_new_shard_starts_from_the_unsharded_watermark(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 2_000, seed=41)  # a fixed past date: the unsharded watermark is outside overlap
    sync_collection(settings, "tasks", clients=clients)
    changed = mutate(db, 60, seed=42).changed

    read = [
        sync_collection(settings, "tasks", clients=clients, shard=Shard(i, 2)).docs_read
        for i in range(2)
    ]

    assert sum(read) == changed  # not a reload of 2,000 + changed, and nothing skipped
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)
    assert set(load_watermarks(clickhouse_client, "tasks")) == {"tasks", "tasks@0/2", "tasks@1/2"}


def test_a_full_refresh_forgets_the_shard_watermarks_too(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 500, seed=43)
    for i in range(2):
        sync_collection(settings, "tasks", clients=clients, shard=Shard(i, 2))

    sync_collection(settings, "tasks", clients=clients, full_refresh=True)
    # A shard mark left behind would make the next shard run skip what lies below it.
    assert set(load_watermarks(clickhouse_client, "tasks")) == {"tasks"}


def test_sync_refuses_a_shard_outside_zero_to_n_minus_one(settings: Settings) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loader", "sync", "--shard", "4/4"],
        env=os.environ | {"MONGO_DB": settings.mongo_db},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert out.returncode != 0
    assert "numbered 0 to N-1" in out.stdout + out.stderr


def test_sync_with_shard_loads_only_that_shard(
    settings: Settings, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 800, seed=44)
    out = subprocess.run(
        [sys.executable, "-m", "loader", "sync", "--collection", "tasks", "--shard", "1/3"],
        env=os.environ | {"MONGO_DB": settings.mongo_db},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert out.returncode == 0, out.stderr
    assert "shard 1/3" in out.stdout
    loaded = {r[0] for r in clickhouse_client.query("SELECT _id FROM raw.tasks").result_rows}
    assert loaded == _shard_ids_in_mongo(db, Shard(1, 3))


def test_the_change_probe_asks_the_shards_so_a_sharded_no_op_run_is_skipped(
    settings: Settings, clients: Clients, db: Database
) -> None:
    seed(db, 1_000, seed=45)  # a fixed past date: the shard marks are outside the overlap
    shards = [Shard(i, 2) for i in range(2)]
    for shard in shards:
        sync_collection(settings, "tasks", clients=clients, shard=shard)

    # The unsharded mark never moved (there is none): only the shard marks say "read".
    assert not has_changes(settings, "tasks", clients=clients, shards=2)
    assert mutate(db, 20, seed=46).changed
    assert has_changes(settings, "tasks", clients=clients, shards=2)
    for shard in shards:
        sync_collection(settings, "tasks", clients=clients, shard=shard)
    # The marks are now inside the overlap window: compared with raw, found equal.
    assert not has_changes(settings, "tasks", clients=clients, shards=2)
