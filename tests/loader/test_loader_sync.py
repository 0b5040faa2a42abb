"""Incremental sync by watermark: exact, incremental, resumable."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from bson.datetime_ms import DatetimeMS
from clickhouse_connect.driver.client import Client
from loader_testlib import Loaded, clickhouse_tasks, mongo_tasks, run_record
from pymongo.database import Database
from pymongo.errors import AutoReconnect

from loader.changes import has_changes
from loader.clients import Clients
from loader.mapping import CODEC_OPTIONS, MAX_DATETIME64_MS
from loader.settings import Settings
from loader.sync import (
    WATERMARK_INDEX,
    WATERMARK_INDEX_NAME,
    BatchStored,
    ensure_watermark_index,
    sync_collection,
)
from loader.watermark import Watermark, load_watermark, save_watermark
from synthetic import mutate, seed


class InjectedCrash(RuntimeError):
    pass


def test_initial_load_equals_mongo_for_every_id(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 3_000, seed=11)

    result = sync_collection(settings, "tasks", clients=clients, batch_size=700)

    assert result.docs_read == 3_000
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_initial_load_fills_bookkeeping_columns(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 500, seed=12)

    result = sync_collection(settings, "tasks", clients=clients)

    bad = clickhouse_client.command(
        "SELECT count() FROM raw.tasks WHERE _run_id != {r:String} OR is_deleted != 0 "
        "OR _version != toUnixTimestamp64Milli(updated_at) "
        "OR _id_created_at "
        "!= toDateTime(reinterpretAsUInt32(reverse(unhex(substring(_id, 1, 8)))))",
        parameters={"r": result.run_id},
    )
    assert bad == 0


def test_employee_collection_loads(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 1_000, seed=13)

    result = sync_collection(settings, "employee", clients=clients)

    assert result.rows_written == db.employee.count_documents({})
    assert (
        clickhouse_client.command("SELECT count() FROM raw.employee FINAL") == result.rows_written
    )


def test_second_sync_without_changes_reads_and_writes_nothing(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    loaded(2_000, seed=21)

    again = sync_collection(settings, "tasks", clients=clients)

    assert (again.docs_read, again.rows_written, again.rejects) == (0, 0, 0)


def test_sync_after_updating_one_percent_reads_only_those(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(5_000, seed=31)
    changed = mutate(db, fraction=0.01, seed=31, new_stages=False)

    result = sync_collection(settings, "tasks", clients=clients)

    assert changed.updated == 50
    assert result.docs_read == changed.updated
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_same_updated_at_across_a_batch_boundary_loses_nothing(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(1_000, seed=41)
    tied = [d["_id"] for d in db.tasks.find({}, {"_id": 1}).sort("_id", 1).limit(250)]
    same = datetime(2026, 6, 1, tzinfo=UTC)  # after the seeded data, well before now
    db.tasks.update_many({"_id": {"$in": tied}}, {"$set": {"updated_at": same}})

    def crash_on_second_batch(stored: BatchStored) -> None:
        if stored.batch_no == 2:
            raise InjectedCrash("stop after the first batch's watermark was saved")

    with pytest.raises(InjectedCrash):
        sync_collection(
            settings, "tasks", clients=clients, batch_size=100, after_insert=crash_on_second_batch
        )
    wm = load_watermark(clickhouse_client, "tasks")
    resumed = sync_collection(settings, "tasks", clients=clients, batch_size=100)

    assert wm is not None and wm.last_id == str(tied[99])  # saved inside the tie
    assert resumed.docs_read == 150
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_late_write_older_than_watermark_inside_overlap_is_picked_up(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    now = datetime.now(UTC)
    seed(db, 1_000, seed=51, end=now - timedelta(seconds=5))
    sync_collection(settings, "tasks", clients=clients)
    wm = load_watermark(clickhouse_client, "tasks")
    assert wm is not None
    # Committed now, stamped 10 s before the watermark: within the 60 s overlap window.
    late = DatetimeMS(wm.updated_at_ms - 10_000)
    victim = db.tasks.find_one({"updated_at": {"$lt": late}}, sort=[("updated_at", 1)])
    db.tasks.update_one(
        {"_id": victim["_id"]}, {"$set": {"status": "rejected", "updated_at": late}}
    )

    sync_collection(settings.model_copy(update={"overlap_seconds": 60}), "tasks", clients=clients)

    row = clickhouse_tasks(clickhouse_client)[str(victim["_id"])]
    assert (row[4], row[6]) == ("rejected", int(late))


def test_crash_after_insert_before_watermark_rerun_leaves_no_duplicate_and_no_loss(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 2_500, seed=61)

    def crash(stored: BatchStored) -> None:
        if stored.batch_no == 2:
            raise InjectedCrash("crash between insert and watermark save")

    with pytest.raises(InjectedCrash):
        sync_collection(settings, "tasks", clients=clients, batch_size=1_000, after_insert=crash)
    rerun = sync_collection(settings, "tasks", clients=clients, batch_size=1_000)

    # Batch 2 was stored but its watermark was not: it is read (and stored) again...
    assert rerun.docs_read == 1_500
    assert clickhouse_client.command("SELECT count() FROM raw.tasks") == 3_500
    # ...and deduplication leaves exactly one row per document, equal to Mongo.
    assert clickhouse_client.command("SELECT count() FROM raw.tasks FINAL") == 2_500
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_failed_run_is_recorded_and_keeps_the_last_stored_watermark(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 1_500, seed=62)
    runs: list[str] = []

    def crash(stored: BatchStored) -> None:
        runs.append(stored.watermark.describe())
        if stored.batch_no == 2:
            raise InjectedCrash("boom")

    with pytest.raises(InjectedCrash):
        sync_collection(settings, "tasks", clients=clients, batch_size=1_000, after_insert=crash)
    rec = clickhouse_client.query(
        "SELECT status, watermark_after, message FROM ops.sync_runs "
        "WHERE collection = 'tasks' ORDER BY started_at DESC LIMIT 1"
    ).result_rows[0]

    assert rec[0] == "failed"
    assert rec[1] == runs[0]
    assert "InjectedCrash" in rec[2]
    # Batch 1's watermark was saved before the crash: the record says so, and where.
    assert f"the watermark of tasks moved to {runs[0]} (from none)" in rec[2]


def test_run_record_accounts_for_every_document(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 2_000, seed=71, malformed_ratio=0.05)

    result = sync_collection(settings, "tasks", clients=clients)
    rec = run_record(clickhouse_client, result.run_id)

    assert rec["status"] == "ok"
    assert rec["docs_read"] == 2_000
    assert rec["docs_read"] == rec["rows_written"] + rec["rejects"]
    assert rec["watermark_after"] == result.watermark_after != ""
    assert rec["peak_rss_bytes"] > 0


def test_has_changes_is_false_after_a_sync(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    loaded(1_000, seed=81)

    assert has_changes(settings, "tasks", clients=clients) is False


def test_has_changes_is_true_after_an_update(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    loaded(1_000, seed=82)
    mutate(db, 1, seed=82)

    assert has_changes(settings, "tasks", clients=clients) is True


def test_full_refresh_reloads_from_scratch(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 1_000, seed=91)
    first = sync_collection(settings, "tasks", clients=clients)
    clickhouse_client.command("INSERT INTO raw.tasks (_id, file_id) VALUES ('stray', 'x')")

    result = sync_collection(settings, "tasks", clients=clients, full_refresh=True)

    assert result.watermark_before == first.watermark_after  # what the refresh replaced
    assert result.docs_read == 1_000
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_missing_watermark_index_is_created_and_reported(
    settings: Settings, clients: Clients, db: Database
) -> None:
    seed(db, 100, seed=92)

    first = sync_collection(settings, "tasks", clients=clients)
    second = sync_collection(settings, "tasks", clients=clients)

    assert (first.index_created, second.index_created) == (True, False)
    assert "created index" in first.message


def test_quiet_sync_examines_only_the_watermark_key_when_many_documents_share_its_date(
    settings: Settings, clients: Clients, db: Database, plain_db: Database
) -> None:
    seed(db, 2_000, seed=95)
    same = datetime(2025, 6, 1, tzinfo=UTC)
    plain_db.tasks.update_many({}, {"$set": {"updated_at": same}})
    sync_collection(settings, "tasks", clients=clients)
    plain_db.command("profile", 2)
    try:
        quiet = sync_collection(settings, "tasks", clients=clients)
        probed = has_changes(settings, "tasks", clients=clients)
    finally:
        plain_db.command("profile", 0)

    reads = list(db["system.profile"].find({"ns": f"{settings.mongo_db}.tasks", "op": "query"}))
    assert (quiet.docs_read, probed) == (0, False)
    assert reads and max(r["keysExamined"] for r in reads) <= 1


def test_index_another_loader_is_still_building_is_waited_for(
    settings: Settings, plain_db: Database
) -> None:
    # Big enough that the build outlasts the few milliseconds until it is listed.
    now = datetime.now(UTC)
    for _ in range(4):
        plain_db.tasks.insert_many([{"updated_at": now} for _ in range(100_000)])
    other_loader = threading.Thread(
        target=plain_db.tasks.create_index,
        args=(WATERMARK_INDEX,),
        kwargs={"name": WATERMARK_INDEX_NAME},
    )
    other_loader.start()
    try:
        while WATERMARK_INDEX_NAME not in plain_db.tasks.index_information():
            time.sleep(0.005)

        ensure_watermark_index(plain_db.tasks, settings)

        assert plain_db.tasks.find_one({}, hint=WATERMARK_INDEX) is not None
    finally:
        other_loader.join()


def test_transient_mongo_error_mid_run_resumes_from_the_last_stored_batch(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 2_500, seed=63)
    failures: list[int] = []

    def drop_connection_once(stored: BatchStored) -> None:
        if stored.batch_no == 2 and not failures:
            failures.append(stored.batch_no)
            raise AutoReconnect("connection reset (injected)")

    result = sync_collection(
        settings, "tasks", clients=clients, batch_size=1_000, after_insert=drop_connection_once
    )

    assert result.status == "ok" and failures == [2]
    assert result.docs_read == 3_500  # the interrupted batch was read twice
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_transient_errors_after_every_batch_do_not_exhaust_the_retries(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    """Only failures in a row count towards LOADER_RETRY_ATTEMPTS (2 here): a read that stores
    a batch between failures goes on, however many failures there are in all."""
    seed(db, 3_500, seed=65)
    failed_at: list[str] = []

    def drop_connection_once_per_batch(stored: BatchStored) -> None:
        if stored.watermark.describe() not in failed_at:
            failed_at.append(stored.watermark.describe())
            raise AutoReconnect("connection reset (injected)")

    result = sync_collection(
        settings,
        "tasks",
        clients=clients,
        batch_size=1_000,
        after_insert=drop_connection_once_per_batch,
    )

    assert result.status == "ok" and len(failed_at) == 4 > settings.retry_attempts
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_cursor_killed_on_the_server_mid_run_is_reopened_at_the_last_stored_batch(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 2_500, seed=64)
    killed: list[int] = []

    def kill_the_cursor_once(stored: BatchStored) -> None:
        # What a mongod restart or failover does to an open cursor: the next getMore fails
        # with CursorNotFound.
        if stored.batch_no == 1 and not killed:
            admin = clients.mongo.get_database("admin", codec_options=CODEC_OPTIONS)
            idle = admin.aggregate(
                [
                    {"$currentOp": {"idleCursors": True}},
                    {
                        "$match": {
                            "ns": f"{settings.mongo_db}.tasks",
                            "type": "idleCursor",
                            # the sync's read (on the watermark index), not a cursor
                            # another test left open
                            "cursor.originatingCommand.hint.updated_at": {"$exists": True},
                        }
                    },
                ]
            )
            for op in idle:
                killed.append(op["cursor"]["cursorId"])
                db.command("killCursors", "tasks", cursors=[op["cursor"]["cursorId"]])

    result = sync_collection(
        settings, "tasks", clients=clients, batch_size=1_000, after_insert=kill_the_cursor_once
    )

    assert result.status == "ok" and len(killed) == 1
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_saving_an_older_watermark_keeps_the_newer_one(
    settings: Settings, clients: Clients, clickhouse_client: Client
) -> None:
    newer = Watermark.at(2_000_000, "b" * 24, 5_000_000)
    save_watermark(clickhouse_client, "tasks", newer, "run-newer")

    save_watermark(clickhouse_client, "tasks", Watermark.at(1_000_000, "c" * 24, 6_000_000), "old")
    save_watermark(clickhouse_client, "tasks", Watermark.at(2_000_000, "a" * 24, 6_000_000), "old")

    assert load_watermark(clickhouse_client, "tasks") == newer


def test_full_refresh_moves_the_watermark_back(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(500, seed=92)
    save_watermark(clickhouse_client, "tasks", Watermark.at(MAX_DATETIME64_MS, "", 0), "far")

    result = sync_collection(settings, "tasks", clients=clients, full_refresh=True)

    assert result.docs_read == 500
    assert load_watermark(clickhouse_client, "tasks").describe() == result.watermark_after
