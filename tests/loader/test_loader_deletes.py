"""Deleted documents become tombstones, through the change stream and through reconcile."""

from __future__ import annotations

import queue
import threading
from datetime import UTC, datetime

import pytest
from bson import ObjectId
from clickhouse_connect.driver.client import Client
from loader_testlib import Loaded, clickhouse_tasks, mongo_tasks
from pymongo.database import Database

from loader.build_pending import clear_build_pending, pending_builds
from loader.clients import Clients
from loader.follower import FollowResult, StoredBatch, follow_changes
from loader.identity import SourceMissing
from loader.reconcile import reconcile_collection
from loader.settings import Settings
from loader.store import FEW_TOMBSTONES, load_resume_token, save_resume_token, write_tombstones
from loader.watermark import now_ms
from synthetic import mutate


def _first_ids(db: Database, n: int) -> list[ObjectId]:
    return [d["_id"] for d in db.tasks.find({}, {"_id": 1}).sort("_id", 1).limit(n)]


def _versions(client: Client, ids: list[ObjectId]) -> list[tuple[str, int, int]]:
    """(_id, is_deleted, _version) of every stored row of `ids`, history included."""
    return client.query(
        "SELECT _id, is_deleted, _version FROM raw.tasks WHERE _id IN {ids:Array(String)} "
        "ORDER BY _id, _version",
        parameters={"ids": [str(i) for i in ids]},
    ).result_rows


def test_delete_becomes_a_tombstone_through_watch(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(500, seed=201, follow=True)
    gone = _first_ids(db, 3)
    before = {k: v for k, v in clickhouse_tasks(clickhouse_client).items() if k in map(str, gone)}
    db.tasks.delete_many({"_id": {"$in": gone}})

    result = follow_changes(settings, "tasks", clients=clients, idle_timeout_s=0.5)

    assert (result.events, result.deletes, result.resumed) == (3, 3, True)
    # The tombstone keeps the last known values; the live set no longer has the documents.
    assert clickhouse_tasks(clickhouse_client, deleted=True) == before
    assert not set(map(str, gone)) & set(clickhouse_tasks(clickhouse_client))


def test_tombstone_through_watch_is_versioned_at_the_deletion_time(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(100, seed=202, follow=True)
    gone = _first_ids(db, 1)
    before_ms = now_ms()
    db.tasks.delete_many({"_id": {"$in": gone}})
    after_ms = now_ms()

    follow_changes(settings, "tasks", clients=clients, idle_timeout_s=0.5)

    (_, live_flag, live_version), (_, dead_flag, dead_version) = _versions(clickhouse_client, gone)
    assert (live_flag, dead_flag) == (0, 1)
    # max(deleted_at_ms, last + 1) with the deletion (the event's wall time) after the last
    # version: the deletion time itself.
    assert live_version < before_ms <= dead_version <= after_ms


@pytest.mark.parametrize(
    ("seed", "deleted_after_ms", "version_after_ms"),
    [
        pytest.param(209, 5_000, 5_000, id="deleted-after-the-last-version"),
        # A deletion stamped earlier than the stored version (clock skew, updated_at ahead).
        pytest.param(210, -5_000, 1, id="dated-before-the-last-version"),
    ],
)
def test_tombstone_takes_the_deletion_time_or_else_the_last_version_plus_one(
    loaded: Loaded,
    clients: Clients,
    db: Database,
    clickhouse_client: Client,
    seed: int,
    deleted_after_ms: int,
    version_after_ms: int,
) -> None:
    loaded(50, seed=seed)
    (gone,) = _first_ids(db, 1)
    last = int(db.tasks.find_one({"_id": gone})["updated_at"])

    write_tombstones(clients, "tasks", {str(gone): last + deleted_after_ms}, "test")

    (_, _, live_version), (_, _, dead_version) = _versions(clickhouse_client, [gone])
    assert (live_version, dead_version) == (last, last + version_after_ms)


@pytest.mark.parametrize("never_stored", [3, FEW_TOMBSTONES + 1], ids=["few", "many"])
def test_a_deleted_id_raw_has_no_row_of_gets_a_bare_tombstone_at_its_deletion_time(
    loaded: Loaded, clients: Clients, db: Database, clickhouse_client: Client, never_stored: int
) -> None:
    # A load that read the document before the delete may store it after the tombstone (a
    # sync or snapshot range beside the follower): its older version must lose to it.
    loaded(20, seed=3)
    (stored,) = _first_ids(db, 1)
    never = [ObjectId() for _ in range(never_stored)]
    deleted_at = now_ms()
    deleted = {str(i): deleted_at for i in [stored, *never]}

    assert write_tombstones(clients, "tasks", deleted, "test") == len(deleted)

    bare = _versions(clickhouse_client, never)
    assert bare == sorted((str(i), 1, deleted_at) for i in never)
    assert write_tombstones(clients, "tasks", deleted, "test") == 0  # a replay writes nothing


def _one_delete_watched_and_one_not_yet(
    settings: Settings, clients: Clients, db: Database
) -> FollowResult:
    """Delete the first task and watch it, then delete the second: the result of that watch."""
    first, second = _first_ids(db, 2)
    db.tasks.delete_one({"_id": first})
    watched = follow_changes(settings, "tasks", clients=clients, idle_timeout_s=0.5)
    db.tasks.delete_one({"_id": second})
    return watched


def test_watch_resumes_after_the_last_processed_event(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    loaded(200, seed=203, follow=True)
    _one_delete_watched_and_one_not_yet(settings, clients, db)

    resumed = follow_changes(settings, "tasks", clients=clients, idle_timeout_s=0.5)

    # Only the event after the stored token is seen again.
    assert (resumed.resumed, resumed.events, resumed.deletes) == (True, 1, 1)


def test_delete_becomes_a_tombstone_through_reconcile(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(3_000, seed=204)
    gone = _first_ids(db, 5)
    db.tasks.delete_many({"_id": {"$in": gone}})

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert result.deletes == 5
    assert set(clickhouse_tasks(clickhouse_client, deleted=True)) == set(map(str, gone))
    assert clickhouse_tasks(clickhouse_client).keys() == {str(d["_id"]) for d in db.tasks.find()}


def test_reconcile_counts_exactly_the_ids_that_differ(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    loaded(3_000, seed=205)
    gone = _first_ids(db, 2)
    db.tasks.delete_many({"_id": {"$in": gone}})

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert (result.differing, result.deletes) == (2, 2)
    assert (result.mongo_ids, result.clickhouse_ids) == (2_998, 3_000)


def test_reconcile_of_an_unchanged_collection_finds_no_difference(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    loaded(1_000, seed=206, malformed_ratio=0.05)  # rejected ids count as known

    result = reconcile_collection(settings, "tasks", clients=clients)

    assert (result.differing, result.deletes) == (0, 0)


def test_deletes_are_counted_in_run_records(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(300, seed=207, follow=True)
    watched = _one_delete_watched_and_one_not_yet(settings, clients, db)
    reconciled = reconcile_collection(settings, "tasks", clients=clients)

    recorded = dict(
        clickhouse_client.query(
            "SELECT run_id, deletes FROM ops.sync_runs WHERE run_id IN {r:Array(String)}",
            parameters={"r": [watched.run_id, reconciled.run_id]},
        ).result_rows
    )

    assert recorded == {watched.run_id: 1, reconciled.run_id: 1}


def test_watch_with_all_changes_loads_updates_and_inserts_without_a_sync(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(300, seed=208, follow=True)
    changed = mutate(db, 10, seed=208)

    result = follow_changes(
        settings, "tasks", clients=clients, idle_timeout_s=0.5, all_changes=True
    )

    assert result.events == changed.updated + changed.inserted
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_watch_after_its_collection_was_dropped_stops_and_forgets_its_position(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    loaded(100, seed=211, follow=True)
    assert load_resume_token(clients, "tasks") is not None
    db.drop_collection("tasks")

    result = follow_changes(settings, "tasks", clients=clients, idle_timeout_s=0.5)

    assert "dropped" in result.stopped_because
    assert load_resume_token(clients, "tasks") is None  # the next run starts from now


def deleted_event_token(db: Database) -> dict:
    """The resume token of a real delete event on `tasks`."""
    with db.tasks.watch([{"$match": {"operationType": "delete"}}], max_await_time_ms=200) as s:
        db.tasks.delete_one({"_id": _first_ids(db, 1)[0]})
        while (event := s.try_next()) is None:
            pass
    return event["_id"]


def test_watch_whose_resume_token_is_not_in_the_oplog_fails_saying_to_reconcile_and_reset(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(100, seed=212)
    data = deleted_event_token(db)["_data"]
    # The same event one second earlier: a position the oplog does not hold (`_data` is a
    # KeyString whose first value, type byte 0x82, is the cluster time: 4 bytes of seconds).
    assert data[:2] == "82"
    missing = {"_data": "82" + f"{int(data[2:10], 16) - 1:08X}" + data[10:]}
    save_resume_token(clients, "tasks", missing, 0)

    with pytest.raises(RuntimeError, match="cannot resume") as failure:
        follow_changes(settings, "tasks", clients=clients, idle_timeout_s=0.5)

    assert "python -m loader reconcile" in str(failure.value)
    assert "watch --reset" in str(failure.value)
    recorded = clickhouse_client.query(
        "SELECT status, message FROM ops.sync_runs WHERE kind = 'watch' "
        "ORDER BY started_at DESC LIMIT 1"
    ).result_rows
    assert recorded[0][0] == "failed" and "cannot resume" in recorded[0][1]


def test_a_steady_trickle_of_writes_is_stored_while_it_lasts(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    """The follower stores what it buffered every LOADER_FLUSH_INTERVAL_MS (0.1 s), not only
    at `flush_every` events or when the stream falls idle: under writes that never pause, the
    first batch lands while the writer is still writing."""
    import time

    loaded(50, seed=210, follow=True)
    stored: list[StoredBatch] = []
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_changes,
        args=(settings, "tasks"),
        kwargs={
            "all_changes": True,
            "stop": stop,
            "on_stored": stored.append,
            "flush_every": 1_000_000,  # only the time budget (or idleness) can flush
        },
        daemon=True,
    )
    follower.start()
    ids = _first_ids(db, 50)
    written = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # writes without a pause
        db.tasks.update_one({"_id": ids[written % len(ids)]}, {"$set": {"status": f"s{written}"}})
        written += 1
    writer_done = time.time()
    stop.set()
    follower.join(timeout=30)

    assert stored and stored[0].stored_at < writer_done
    assert sum(b.events for b in stored) == written


def test_the_last_version_of_a_document_in_a_batch_is_the_one_stored(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    loaded(20, seed=211, follow=True)
    target = _first_ids(db, 1)[0]
    for i in range(20):
        db.tasks.update_one({"_id": target}, {"$set": {"status": f"step-{i}"}})
    gone = _first_ids(db, 3)[1:]
    db.tasks.update_many({"_id": {"$in": gone}}, {"$set": {"status": "about to go"}})
    db.tasks.delete_many({"_id": {"$in": gone}})

    result = follow_changes(
        settings, "tasks", clients=clients, idle_timeout_s=0.5, all_changes=True
    )

    assert (result.events, result.batches) == (24, 1)
    rows = _versions(clickhouse_client, [target, *gone])
    # One new row for the document updated 20 times (its last version), tombstones for the rest.
    assert len([r for r in rows if r[0] == str(target)]) == 2
    assert clickhouse_tasks(clickhouse_client)[str(target)] == mongo_tasks(db)[str(target)]
    assert all(
        r[1] == 1
        for r in rows
        if r[0] in map(str, gone)
        and r == max((x for x in rows if x[0] == r[0]), key=lambda x: x[2])
    )


def test_a_delete_marks_the_build_pending_again_after_a_build_cleared_the_mark(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    """A delete is invisible to the watermark: no scheduled run would load it, so the follower
    marks the build pending again even when a build cleared its first mark meanwhile."""
    loaded(200, seed=231, follow=True)
    stored: queue.Queue[StoredBatch] = queue.Queue()
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_changes,
        args=(settings, "tasks"),
        kwargs={"stop": stop, "all_changes": True, "on_stored": stored.put},
    )
    follower.start()
    try:
        assert mutate(db, 3, seed=4).updated > 0
        stored.get(timeout=60)  # the first batch marked the build pending
        clear_build_pending(
            clickhouse_client, ["tasks"], "a-build", build_started_at=datetime.now(UTC)
        )
        assert "tasks" not in pending_builds(clickhouse_client, ["tasks"])
        db.tasks.delete_one({"_id": _first_ids(db, 1)[0]})
        while stored.get(timeout=60).deletes == 0:
            pass
    finally:
        stop.set()
        follower.join(timeout=60)

    assert "tasks" in pending_builds(clickhouse_client, ["tasks"])


def test_a_batch_of_updates_and_deletes_stores_rows_and_tombstones_together(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    """The tombstones of a batch that also has rows go into raw in the same insert as them:
    each keeps its own values (the rows their new ones, the tombstones the last known ones)."""
    loaded(300, seed=209, follow=True)
    gone, changed = _first_ids(db, 3), _first_ids(db, 6)[3:]
    before = {k: v for k, v in clickhouse_tasks(clickhouse_client).items() if k in map(str, gone)}
    db.tasks.update_many(
        {"_id": {"$in": changed}}, {"$set": {"status": "rejected", "updated_at": datetime.now(UTC)}}
    )
    db.tasks.delete_many({"_id": {"$in": gone}})
    stored: list[StoredBatch] = []

    result = follow_changes(
        settings,
        "tasks",
        clients=clients,
        idle_timeout_s=0.5,
        all_changes=True,
        flush_interval_s=5.0,  # one batch holds all six events
        on_stored=stored.append,
    )

    assert (result.events, result.deletes) == (6, 3)
    assert [(b.rows, b.deletes) for b in stored] == [(3, 3)]
    assert clickhouse_tasks(clickhouse_client, deleted=True) == before
    assert clickhouse_tasks(clickhouse_client) == mongo_tasks(db)


def test_watch_of_a_database_that_does_not_exist_stops_naming_the_variables(
    loaded: Loaded, settings: Settings, clients: Clients, db: Database
) -> None:
    """A mistyped MONGO_DB names no database; the stream of its collection shows nothing, and
    its position would replace the real one: the follower says so instead of following it."""
    loaded(50, seed=210, follow=True)
    position = load_resume_token(clients, "tasks")
    mistyped = settings.model_copy(update={"mongo_db": f"{settings.mongo_db}_typo"})

    with pytest.raises(SourceMissing) as failure:
        follow_changes(mistyped, "tasks", idle_timeout_s=0.5, all_changes=True)

    assert "MONGO_DB" in str(failure.value) and f"{settings.mongo_db}_typo" in str(failure.value)
    assert load_resume_token(clients, "tasks") == position
