"""On a ClickHouse older than 25.7 every delete of the pipeline_state paths goes without patch
parts (`lightweight_delete_mode = 'lightweight_update'` is a 25.7 setting), in the follower's
settle and in the dbt build alike.

The older server is faked where its version is read (`Clients.server_version`, and the dbt
vars `ServerVersion.dbt_vars()` gives), and the statements are recorded on their way to the
embedded engine (tests/clickhouse_recorder.py): what the engine runs is real.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from clickhouse_recorder import Recording, recording_proxy
from mongo_oracle import current_task_per_file, warehouse_state

from loader.clients import open_clients
from loader.server_version import ServerVersion
from loader.settings import Settings
from loader.state import settle_files

RELEASES = [("25.3.6.56", False), ("26.9.1.1", True)]  # (reported version, patch parts)


def _add_stale_candidate(ch: Any, file_id: str) -> None:
    """A candidate outranking the file's true state in the store that raw supersedes (the
    current task's row with a later `assigned_at` than its current version has, as if it had
    moved backwards since): settling must delete it."""
    ch.command(
        "INSERT INTO analytics.pipeline_state_store SELECT * REPLACE ("
        "assigned_at + INTERVAL 1 YEAR AS assigned_at, "
        "rank + bitShiftLeft(toUInt256(1), 250) AS rank) "
        "FROM analytics.pipeline_state_store FINAL WHERE file_id = {f:String}",
        parameters={"f": file_id},
    )


def _deletes(recording: Recording) -> list[str]:
    return [f"{r.sql} {r.params}" for r in recording.requests if "delete from" in r.sql.lower()]


@pytest.mark.parametrize(("reported", "patch_parts"), RELEASES)
def test_the_follower_settle_deletes_with_patch_parts_only_where_the_server_has_them(
    built: Any, reported: str, patch_parts: bool
) -> None:
    db, ch = built.db, built.ch
    file_id = sorted(current_task_per_file(db))[0]
    _add_stale_candidate(ch, file_id)

    with recording_proxy(built.settings.clickhouse_port) as recording:
        proxied = Settings(**{**built.settings.model_dump(), "clickhouse_port": recording.port})
        with open_clients(proxied) as clients:
            clients.server_version = ServerVersion.parse(reported)
            settle_files(clients, [file_id])

    deletes = _deletes(recording)
    assert deletes, "settling deleted the stale candidate"
    assert all(("lightweight_update" in d) == patch_parts for d in deletes), deletes
    assert warehouse_state(ch).get(file_id) == current_task_per_file(db)[file_id]


@pytest.mark.parametrize(("reported", "patch_parts"), RELEASES)
def test_a_build_deletes_with_patch_parts_only_where_the_server_has_them(
    built: Any, dbt: Any, monkeypatch: pytest.MonkeyPatch, reported: str, patch_parts: bool
) -> None:
    db, ch = built.db, built.ch
    task = db.tasks.find_one({}, sort=[("_id", 1)])
    db.tasks.update_one(
        {"_id": task["_id"]}, {"$set": {"status": "done", "updated_at": datetime.now(UTC)}}
    )
    built.load()
    _add_stale_candidate(ch, task["file_id"])  # the build's settle deletes it

    with recording_proxy(built.settings.clickhouse_port) as recording:
        monkeypatch.setenv("CLICKHOUSE_PORT", str(recording.port))
        dbt.ok("run", "--select", "task_events+", dbt_vars=ServerVersion.parse(reported).dbt_vars())

    deletes = _deletes(recording)
    # One replaces the changed task's row in task_events, one removes the stale candidate.
    assert len(deletes) >= 2, deletes
    assert all(("lightweight_update" in d) == patch_parts for d in deletes), deletes
    assert warehouse_state(ch) == current_task_per_file(db)
