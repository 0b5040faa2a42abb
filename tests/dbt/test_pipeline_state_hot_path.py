"""The hot path: the change-stream follower alone keeps `pipeline_state` equal to MongoDB.

No dbt run happens between a change and the comparison: the follower stores each micro-batch in
`raw.tasks`, the materialized view carries every version into `pipeline_state_store`, and the
follower settles what the view cannot retract (`loader.state`). After the changes a build must
leave everything (task_events, pipeline_state, the marts) equal to what MongoDB says, and the
full recomputation tests must pass. Expected states come from MongoDB through
`tests/mongo_oracle.py`, never from the warehouse.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from mongo_oracle import current_task_per_file, differences_from_mongo, warehouse_state
from test_pipeline_state_older_servers import _add_stale_candidate
from test_pipeline_state_scenario import STEPS
from testkit import new_task

from loader.follower import StoredBatch, follow_changes


def _differing(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    wrong = sorted(f for f in expected.keys() | actual.keys() if expected.get(f) != actual.get(f))
    return [f"{f}: expected {expected.get(f)}, got {actual.get(f)}" for f in wrong]


def _follow(warehouse: Any, **kwargs: Any) -> Any:
    """One follower run over what is waiting in the change stream, all changes loaded."""
    return follow_changes(
        warehouse.settings, "tasks", all_changes=True, idle_timeout_s=0.3, **kwargs
    )


@pytest.fixture
def following(built: Any) -> Any:
    """A built warehouse whose follower has stored its position (later runs resume there)."""
    built.ch.command("TRUNCATE TABLE ops.change_stream_state")
    _follow(built, max_events=0)
    return built


def test_the_follower_alone_keeps_pipeline_state_equal_to_mongodb_after_each_kind_of_change(
    following: Any, dbt: Any
) -> None:
    db, ch = following.db, following.ch
    assert not _differing(current_task_per_file(db), warehouse_state(ch))
    for step in STEPS:
        before = current_task_per_file(db)
        step.change(db)
        assert current_task_per_file(db) != before, f"step {step.name!r} changed nothing"

        result = _follow(following)

        assert result.events > 0 and result.batches > 0
        wrong = _differing(current_task_per_file(db), warehouse_state(ch))
        assert not wrong, f"after {step.name!r} (no build): {len(wrong)} differ: {wrong[:3]}"

    # A build after changes that arrived through the hot path converges to the same state, the
    # marts included, and the recomputation tests agree.
    dbt.ok("run", "--select", "task_events+")
    assert differences_from_mongo(db, ch) == {}
    dbt.ok("test", "--select", "tag:full_recompute")


def test_a_batch_replayed_after_the_follower_died_before_settling_it_settles_the_same(
    following: Any,
) -> None:
    db, ch = following.db, following.ch
    file_id = next(f for f, s in current_task_per_file(db).items() if s[4])
    current = ObjectId(current_task_per_file(db)[file_id][4])
    db.tasks.delete_one({"_id": current})  # a retraction: the view alone would keep the row

    def die() -> None:
        raise RuntimeError("follower killed after storing its batch")

    with pytest.raises(RuntimeError, match="killed"):
        _follow(following, after_store=die)
    # Stored but not settled: the deleted task still shows as the file's current one.
    assert warehouse_state(ch).get(file_id, (None,) * 5)[4] == str(current)

    replayed = _follow(following)  # resumes from the token saved before the batch

    assert replayed.resumed and replayed.events >= 1
    assert not _differing(current_task_per_file(db), warehouse_state(ch))


def test_a_task_deleted_and_inserted_again_in_another_file_leaves_its_old_file(
    following: Any,
) -> None:
    """Inserts are not settled (a new document has no earlier version), but an `_id`
    inserted again right after its delete does have one: the file it was current in must
    fall back to its next task, though the batch holds only the insert's document."""
    db, ch = following.db, following.ch
    per_file: dict[str, int] = {}
    for doc in db.tasks.find({}, {"file_id": 1}):
        per_file[doc["file_id"]] = per_file.get(doc["file_id"], 0) + 1
    states = sorted(current_task_per_file(db).items())
    old_file = next(f for f, s in states if per_file[f] > 1)
    new_file = next(f for f, _ in states if f != old_file)
    task = db.tasks.find_one({"_id": ObjectId(current_task_per_file(db)[old_file][4])})
    assert task is not None
    db.tasks.delete_one({"_id": task["_id"]})
    db.tasks.insert_one(task | {"file_id": new_file, "updated_at": datetime.now(UTC)})

    result = _follow(following)

    assert result.events == 2 and result.batches == 1, "the delete and insert in one batch"
    assert warehouse_state(ch)[old_file][4] != str(task["_id"])
    assert not _differing(current_task_per_file(db), warehouse_state(ch))


def test_a_replay_restores_a_file_that_an_interrupted_settle_left_without_any_row(
    following: Any,
) -> None:
    """A settle killed after a merge dropped the file's new best row and after the delete of
    the outranking (deleted) task's row, before inserting the best row again, leaves the file
    with no row. The replayed batch holds only the deleted task, no live version of the file:
    the file must still be found and recomputed."""
    db, ch = following.db, following.ch
    per_file: dict[str, int] = {}
    for doc in db.tasks.find({}, {"file_id": 1}):
        per_file[doc["file_id"]] = per_file.get(doc["file_id"], 0) + 1
    file_id = next(f for f, s in sorted(current_task_per_file(db).items()) if per_file[f] > 1)
    current = ObjectId(current_task_per_file(db)[file_id][4])
    db.tasks.delete_one({"_id": current})

    def die() -> None:
        raise RuntimeError("follower killed after storing its batch")

    with pytest.raises(RuntimeError, match="killed"):
        _follow(following, after_store=die)
    # What the interrupted settle left: no row of the file at all.
    ch.command(
        "DELETE FROM analytics.pipeline_state_store WHERE file_id = {f:String}",
        parameters={"f": file_id},
    )
    assert file_id not in warehouse_state(ch)

    replayed = _follow(following)

    assert replayed.resumed and replayed.events >= 1
    assert warehouse_state(ch).get(file_id) == current_task_per_file(db)[file_id]
    assert not _differing(current_task_per_file(db), warehouse_state(ch))


def test_a_build_settles_a_stale_candidate_that_a_late_load_left_in_the_store(
    built: Any, dbt: Any
) -> None:
    """A loader that read a task before its newer version was stored (a sync racing the
    follower) inserts the older version last: raw keeps the newer one, but the view has already
    made the older one a candidate. Here the older version had a later assigned_at, so it
    outranks the file's true state until a settle removes it."""
    db, ch = built.db, built.ch
    task_id = ch.query(
        "SELECT task_id FROM analytics.pipeline_state ORDER BY file_id LIMIT 1"
    ).result_rows[0][0]
    columns = [
        r[0]
        for r in ch.query(
            "SELECT name FROM system.columns WHERE database = 'raw' AND table = 'tasks' "
            "ORDER BY position"
        ).result_rows
    ]
    older = {
        "_version": "_version - 1",
        "assigned_at": "assigned_at + INTERVAL 30 DAY",
        "_loaded_at": "now64(3, 'UTC')",
    }
    select = ", ".join(f"{older.get(c, c)} AS `{c}`" for c in columns)
    ch.command(
        f"INSERT INTO raw.tasks ({', '.join(f'`{c}`' for c in columns)}) "
        f"SELECT {select} FROM (SELECT * FROM raw.tasks FINAL WHERE _id = {{t:String}})",
        parameters={"t": task_id},
    )
    assert _differing(current_task_per_file(db), warehouse_state(ch)), "the stale row shows"

    dbt.ok("run", "--select", "task_events+")

    assert not _differing(current_task_per_file(db), warehouse_state(ch))
    dbt.ok("test", "--select", "assert_pipeline_state_matches_naive_recomputation")


def _store_a_version_ahead_of_raw(ch: Any, file_id: str) -> tuple[str, int, str]:
    """What a settle can read while a newer version of a file's current task is being stored:
    its candidate row in the store (the materialized view wrote it) and raw not showing it
    yet (the settle read raw first). Returns the task id, the new version and its status."""
    task_id, status = ch.query(
        "SELECT task_id, status FROM analytics.pipeline_state_store FINAL "
        "WHERE file_id = {f:String}",
        parameters={"f": file_id},
    ).result_rows[0]
    newer = "rejected" if status != "rejected" else "done"
    version = int(time.time() * 1000)  # `_version`: updated_at in milliseconds
    ch.command(
        "INSERT INTO analytics.pipeline_state_store SELECT * REPLACE ({s:String} AS status, "
        "rank - bitAnd(rank, toUInt256('18446744073709551615')) + {v:UInt64} AS rank) "
        "FROM analytics.pipeline_state_store FINAL WHERE file_id = {f:String}",
        parameters={"f": file_id, "s": newer, "v": version},
    )
    return task_id, version, newer


def _store_in_mongo(db: Any, task_id: str, version: int, status: str) -> None:
    """The version `_store_a_version_ahead_of_raw` made up, written to MongoDB."""
    updated_at = datetime.fromtimestamp(version / 1000, UTC)
    db.tasks.update_one(
        {"_id": ObjectId(task_id)}, {"$set": {"status": status, "updated_at": updated_at}}
    )


def test_a_settle_keeps_a_candidate_newer_than_the_raw_it_recomputed_from(built: Any) -> None:
    """A version stored while a settle runs can be in the store but not yet in what the
    settle read from raw: its row outranks the recomputed best row, yet it is the newest
    state, and the settle must not delete it (a CI run of the follower under a mongod restart
    showed a file with its task's previous assignee, the newer row deleted so)."""
    from loader.clients import open_clients
    from loader.state import settle_files

    db, ch = built.db, built.ch
    file_id = sorted(current_task_per_file(db))[0]
    task_id, version, status = _store_a_version_ahead_of_raw(ch, file_id)

    with open_clients(built.settings) as clients:
        assert settle_files(clients, [file_id]) == 0

    shown = warehouse_state(ch)[file_id]
    assert (shown[2], shown[4]) == (status, task_id), "the settle deleted the newer row"
    _store_in_mongo(db, task_id, version, status)
    built.load()
    assert warehouse_state(ch)[file_id] == current_task_per_file(db)[file_id]


def _a_file_the_next_build_settles(built: Any) -> tuple[str, str]:
    """A file with more than one task, one of them changed (not its current one) and loaded, so
    the next build settles the file; returns the file and its current task."""
    db = built.db
    per_file: dict[str, int] = {}
    for doc in db.tasks.find({}, {"file_id": 1}):
        per_file[doc["file_id"]] = per_file.get(doc["file_id"], 0) + 1
    file_id = next(f for f in sorted(current_task_per_file(db)) if per_file[f] > 1)
    current = current_task_per_file(db)[file_id][4]
    other = db.tasks.find_one({"file_id": file_id, "_id": {"$ne": ObjectId(current)}})
    assert other is not None
    db.tasks.update_one(
        {"_id": other["_id"]}, {"$set": {"note": "touched", "updated_at": datetime.now(UTC)}}
    )
    built.load()
    return file_id, current


def test_a_build_keeps_a_candidate_that_a_load_stored_while_it_settled(
    built: Any, dbt: Any
) -> None:
    """The same race in a build's settle (a follower storing while dbt runs): a file the build
    settles holds a row of a version raw did not show when the build recomputed it."""
    db, ch = built.db, built.ch
    file_id, _ = _a_file_the_next_build_settles(built)
    task_id, version, status = _store_a_version_ahead_of_raw(ch, file_id)

    dbt.ok("run", "--select", "task_events+")

    assert warehouse_state(ch)[file_id][2] == status, "the build deleted the newer row"
    _store_in_mongo(db, task_id, version, status)
    built.load()
    assert not _differing(current_task_per_file(db), warehouse_state(ch))
    dbt.ok("run", "--select", "task_events+")
    dbt.ok("test", "--select", "assert_pipeline_state_matches_naive_recomputation")


def test_a_build_settles_again_a_file_whose_task_the_follower_deleted_while_it_settled(
    built: Any, dbt: Any
) -> None:
    """The follower stores and settles a delete between the build's recomputation of a file
    and the build's insert of that file's best row: the build re-inserts the deleted task's
    row, which the follower has already settled away. The build must notice that raw
    supersedes what its file shows and settle the file again."""
    db, ch = built.db, built.ch
    file_id, current = _a_file_the_next_build_settles(built)
    db.tasks.delete_one({"_id": ObjectId(current)})
    follower_meanwhile = [  # its tombstone, then the deleted task out of the store (its settle)
        "INSERT INTO raw.tasks SELECT * REPLACE (1 AS is_deleted, _version + 1 AS _version, "
        f"now64(3, 'UTC') AS _loaded_at) FROM raw.tasks FINAL WHERE _id = '{current}'",
        f"DELETE FROM analytics.pipeline_state_store WHERE task_id = '{current}'",
    ]

    dbt.ok(
        "run",
        "--select",
        "task_events+",
        dbt_vars={"pipeline_state_test_after_recompute": follower_meanwhile},
    )

    assert warehouse_state(ch).get(file_id) == current_task_per_file(db)[file_id]
    assert not _differing(current_task_per_file(db), warehouse_state(ch))


def test_a_merge_between_inserting_the_best_row_and_deleting_the_stale_one_loses_nothing(
    built: Any,
) -> None:
    """ReplacingMergeTree keeps each file's top row when it merges. Right after the recomputed
    best row is inserted, the top row is still the stale one: a merge then drops the best row,
    and the delete of the stale row would leave the file with no row at all."""
    from loader.clients import open_clients
    from loader.state import settle_files

    db, ch = built.db, built.ch
    file_id = sorted(current_task_per_file(db))[0]
    _add_stale_candidate(ch, file_id)
    assert warehouse_state(ch)[file_id] != current_task_per_file(db)[file_id]

    with open_clients(built.settings) as clients:
        settle_files(
            clients,
            [file_id],
            after_insert=lambda: ch.command("OPTIMIZE TABLE analytics.pipeline_state_store FINAL"),
        )

    assert warehouse_state(ch).get(file_id) == current_task_per_file(db)[file_id]


def _drop_the_file_rows(file_id: str) -> str:
    """What a merge that began before a settle's delete and ends after it leaves of a file: the
    stale row (which the delete hides) and not the best row (dropped for being below it). Here
    every row of the file goes, which shows the same as that (the stale row is hidden)."""
    return f"DELETE FROM analytics.pipeline_state_store WHERE file_id = '{file_id}'"


def test_a_best_row_a_merge_drops_after_the_settle_deleted_the_stale_one_is_put_back(
    built: Any,
) -> None:
    """A merge may end after the delete, and after any read that found the best row in place:
    only a copy of the best row inserted after the delete is safe from it."""
    from loader.clients import open_clients
    from loader.state import settle_files

    db, ch = built.db, built.ch
    file_id = sorted(current_task_per_file(db))[0]
    _add_stale_candidate(ch, file_id)

    with open_clients(built.settings) as clients:
        settle_files(
            clients, [file_id], after_delete=lambda: ch.command(_drop_the_file_rows(file_id))
        )

    assert warehouse_state(ch).get(file_id) == current_task_per_file(db)[file_id]


def test_a_build_puts_back_a_best_row_a_merge_drops_after_its_delete(built: Any, dbt: Any) -> None:
    """The same merge in a build's settle."""
    db, ch = built.db, built.ch
    file_id, _ = _a_file_the_next_build_settles(built)
    _add_stale_candidate(ch, file_id)

    dbt.ok(
        "run",
        "--select",
        "task_events+",
        dbt_vars={"pipeline_state_test_after_delete": [_drop_the_file_rows(file_id)]},
    )

    assert warehouse_state(ch).get(file_id) == current_task_per_file(db)[file_id]


def test_a_burst_of_writes_while_the_follower_runs_loses_and_duplicates_nothing(
    following: Any, dbt: Any
) -> None:
    from synthetic import mutate

    db, ch = following.db, following.ch
    stop = threading.Event()
    stored: list[StoredBatch] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            follow_changes(
                following.settings, "tasks", all_changes=True, stop=stop, on_stored=stored.append
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        employees = list(db.employee.find({}, {"employee_code": 1, "employee_name": 1}))
        now = datetime.now(UTC)
        files = sorted(current_task_per_file(db))
        new = [
            {
                "_id": ObjectId(),
                "file_id": files[i % len(files)] if i % 3 else f"BURST-{i:05d}",
                "stage": "review",
                "employee_code": employees[i % len(employees)]["employee_code"],
                "employee_name": employees[i % len(employees)]["employee_name"],
                "status": "assigned",
                "assigned_at": now + timedelta(milliseconds=i),
                "updated_at": now,
            }
            for i in range(3_000)
        ]
        for start in range(0, len(new), 500):
            db.tasks.insert_many(new[start : start + 500])
        for seed in range(5):
            mutate(db, 100, seed=300 + seed)
        db.tasks.delete_many({"_id": {"$in": [d["_id"] for d in new[::7]]}})
        written = db.tasks.count_documents({})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not errors:
            time.sleep(0.5)
            state = warehouse_state(ch)
            live = ch.query("SELECT count() FROM raw.tasks FINAL WHERE is_deleted = 0").result_rows
            if live[0][0] == written and not _differing(current_task_per_file(db), state):
                break
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert len(stored) > 1, "a burst is stored in several batches"
    assert not _differing(current_task_per_file(db), warehouse_state(ch))
    dupes = ch.query(
        "SELECT count() FROM (SELECT file_id FROM analytics.pipeline_state "
        "GROUP BY file_id HAVING count() > 1)"
    ).result_rows[0][0]
    assert dupes == 0
    dbt.ok("run", "--select", "task_events+")
    assert differences_from_mongo(db, ch) == {}


def test_a_follower_that_fell_behind_records_its_lag(following: Any) -> None:
    db, ch = following.db, following.ch
    task = db.tasks.find_one({})
    db.tasks.update_one({"_id": task["_id"]}, {"$set": {"status": "in_progress"}})
    time.sleep(1.5)  # the follower is not running: the write waits in the change stream

    stored: list[StoredBatch] = []
    _follow(following, on_stored=stored.append)

    assert stored and stored[-1].lag_seconds >= 1.5
    lag, last_event_at = ch.query(
        "SELECT lag_seconds, last_event_at FROM ops.change_stream_state FINAL "
        "WHERE collection = 'tasks'"
    ).result_rows[0]
    assert lag >= 1.5 and last_event_at is not None


def test_new_tasks_show_while_an_earlier_batch_is_still_being_settled(following: Any) -> None:
    """A batch without retractions is in pipeline_state once it is stored (the materialized
    view): the follower stores it without waiting for the settle of the batches before it.
    Here the settle of a delete is held while two new tasks arrive, each in a batch of its own;
    both must show before the settle is let go."""
    db, ch = following.db, following.ch
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        if not held.is_set():
            held.set()
            release.wait(timeout=120)

    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            follow_changes(
                following.settings, "tasks", all_changes=True, stop=stop, before_settle=hold
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    employee = db.employee.find_one({})
    try:
        db.tasks.delete_one({"_id": ObjectId(next(iter(current_task_per_file(db).values()))[4])})
        assert held.wait(timeout=60), "the delete's batch never reached the settler"
        for i in range(2):
            task = ObjectId()
            db.tasks.insert_one(new_task(f"WHILE-SETTLING-{i}", employee, _id=task))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not errors:
                if warehouse_state(ch).get(f"WHILE-SETTLING-{i}", (None,) * 5)[4] == str(task):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"new task {i} did not show while a settle was held")
            assert not release.is_set()
    finally:
        release.set()
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert not _differing(current_task_per_file(db), warehouse_state(ch))


def test_settling_a_retraction_to_a_fallback_row_the_store_holds_copies_it_only_after_the_delete(
    built: Any,
) -> None:
    """A file whose current task is deleted falls back to a candidate the store kept: the
    settle inserts no copy of it before deleting the outranking row (the store shows it once
    that row goes), and one after (the copy no merge that began before the delete can drop)."""
    from loader.clients import open_clients
    from loader.state import settle_files

    db, ch = built.db, built.ch
    file_id = sorted(current_task_per_file(db))[0]
    fallback = ch.query(
        "SELECT rank FROM analytics.pipeline_state_store FINAL WHERE file_id = {f:String}",
        parameters={"f": file_id},
    ).result_rows[0][0]
    _add_stale_candidate(ch, file_id)
    ch.command("SYSTEM STOP MERGES analytics.pipeline_state_store")
    try:

        def copies() -> int:
            return int(
                ch.query(
                    "SELECT count() FROM analytics.pipeline_state_store "
                    "WHERE file_id = {f:String} AND rank = {r:UInt256}",
                    parameters={"f": file_id, "r": fallback},
                ).result_rows[0][0]
            )

        before = copies()
        with open_clients(built.settings) as clients:
            assert settle_files(clients, [file_id]) == 1

        assert copies() == before + 1
    finally:
        ch.command("SYSTEM START MERGES analytics.pipeline_state_store")
    assert warehouse_state(ch).get(file_id) == current_task_per_file(db)[file_id]


def test_the_settle_finds_the_tasks_files_by_the_members_projection(built: Any) -> None:
    """The settle looks up the files of the given tasks in `pipeline_state_members` by its
    by_task projection, not by reading every member (force_optimize_projection refuses a
    query that uses no projection)."""
    from loader.clients import open_clients
    from loader.state import RetractingTasks, ViewTexts, recompute

    db = built.db
    retracting = RetractingTasks()
    retracting.add_deleted(str(d["_id"]) for d in db.tasks.find({}, {"_id": 1}).limit(5))
    with open_clients(built.settings) as clients:
        for params in retracting.params():
            found = recompute(clients, ViewTexts(), params, {"force_optimize_projection": 1})
            assert found.files, "the tasks' files were found"


def test_a_settle_against_the_view_of_an_older_dbt_project_says_to_run_a_build(
    built: Any,
) -> None:
    """After an upgrade of the loader and before the first build of the new dbt project, the
    view still has its earlier shape: the follower says what to run instead of a SQL error."""
    from loader.clients import open_clients
    from loader.errors import ActionableError
    from loader.state import settle_files

    ch = built.ch
    ch.command(
        "CREATE OR REPLACE VIEW analytics.pipeline_state_recomputed AS "
        "SELECT 'best' AS kind, file_id, rank, stage, employee_code, employee_name, status, "
        "assigned_at, task_id FROM analytics.pipeline_state_store "
        "WHERE file_id IN {file_ids:Array(String)}"
    )
    file_id = sorted(current_task_per_file(built.db))[0]
    with open_clients(built.settings) as clients, pytest.raises(ActionableError, match="dbt"):
        settle_files(clients, [file_id])
