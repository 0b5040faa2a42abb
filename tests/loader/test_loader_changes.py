"""`has_changes` inside the overlap window: judged by content, not by the window being non-empty.

Every document here is stamped a few seconds ago, so after a sync the watermark lies inside
the overlap window (`LOADER_OVERLAP_SECONDS`, 60 s) and the next sync would re-read them all.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.database import Database

from loader.changes import has_changes
from loader.clients import Clients
from loader.settings import Settings
from loader.sync import sync_collection
from loader.watermark import load_watermark, now_ms, read_bounds


def task(i: int, updated_at: datetime) -> dict[str, Any]:
    return {
        "file_id": f"F{i:05d}",
        "stage": "intake",
        "employee_code": "E001",
        "employee_name": "Employee 1",
        "status": "assigned",
        "assigned_at": updated_at - timedelta(minutes=5),
        "updated_at": updated_at,
    }


@pytest.fixture
def written(settings: Settings, clients: Clients, plain_db: Database) -> datetime:
    """200 tasks written seconds ago and synced: the window holds all of them."""
    stamp = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    plain_db.tasks.insert_many([task(i, stamp - timedelta(milliseconds=i)) for i in range(200)])
    sync_collection(settings, "tasks", clients=clients)
    return stamp


def test_nothing_written_since_the_sync_is_no_change_inside_the_window(
    settings: Settings, clients: Clients, written: datetime
) -> None:
    assert has_changes(settings, "tasks", clients=clients) is False


def test_an_update_that_keeps_updated_at_is_a_change(
    settings: Settings, clients: Clients, plain_db: Database, written: datetime
) -> None:
    plain_db.tasks.update_one({"file_id": "F00007"}, {"$set": {"status": "done"}})

    assert has_changes(settings, "tasks", clients=clients) is True


def test_an_update_moving_updated_at_within_the_window_is_a_change(
    settings: Settings, clients: Clients, plain_db: Database, written: datetime
) -> None:
    earlier = written - timedelta(seconds=20)
    plain_db.tasks.update_one(
        {"file_id": "F00003"}, {"$set": {"stage": "review", "updated_at": earlier}}
    )

    assert has_changes(settings, "tasks", clients=clients) is True


def test_a_late_commit_inside_the_window_is_a_change(
    settings: Settings, clients: Clients, plain_db: Database, written: datetime
) -> None:
    plain_db.tasks.insert_one(task(999, written - timedelta(seconds=10)))

    assert has_changes(settings, "tasks", clients=clients) is True


def test_a_delete_inside_the_window_is_a_change(
    settings: Settings, clients: Clients, plain_db: Database, written: datetime
) -> None:
    plain_db.tasks.delete_one({"file_id": "F00011"})

    assert has_changes(settings, "tasks", clients=clients) is True


def test_a_rejected_document_already_recorded_is_no_change(
    settings: Settings, clients: Clients, plain_db: Database, written: datetime
) -> None:
    bad = task(500, written - timedelta(seconds=1)) | {"file_id": ""}  # rejected: empty file_id
    plain_db.tasks.insert_one(bad)
    assert has_changes(settings, "tasks", clients=clients) is True  # not recorded yet
    sync_collection(settings, "tasks", clients=clients)

    assert has_changes(settings, "tasks", clients=clients) is False


def test_a_window_found_unchanged_closes_without_a_sync(
    settings: Settings, clients: Clients, plain_db: Database
) -> None:
    quick = settings.model_copy(update={"overlap_seconds": 1.0})
    # Stamped a little ahead: the watermark stays inside the window of the sync that read it.
    ahead = datetime.now(UTC) + timedelta(seconds=10)  # more than a sync takes, even under load
    plain_db.tasks.insert_many([task(i, ahead) for i in range(20)])
    sync_collection(quick, "tasks", clients=clients)
    # Once a read start lies an overlap past the watermark, the window has passed; only this
    # probe can have moved the read start there.
    time.sleep(max(0.0, (ahead - datetime.now(UTC)).total_seconds()) + 1.3)
    assert has_changes(quick, "tasks", clients=clients) is False  # compared the window

    wm = load_watermark(clients.clickhouse, "tasks")
    assert wm is not None
    bounds = read_bounds(wm, quick.overlap_seconds, quick.max_future_seconds, now_ms())
    assert bounds.lower_id is not None  # past the window: the exact probe from the watermark
