"""The warehouse never silently disagrees with MongoDB: each way a user made it disagree
converges in one flow run, and every analytics relation then equals its recomputation from
MongoDB's documents (tests/mongo_oracle.py), not from the warehouse itself."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from bson import ObjectId
from mongo_oracle import current_task_per_file, differences_from_mongo, warehouse_state

from flows.pipeline import sync_pipeline
from loader.identity import SourceMissing
from synthetic import seed

if TYPE_CHECKING:  # fixtures' types, from this suite's conftest.py
    from conftest import Pipeline

pytestmark = pytest.mark.timeout(900)


def alerts_of(pipeline: Pipeline, run_id: str, kind: str) -> list[dict[str, Any]]:
    return pipeline.rows(
        "SELECT subject, value, message FROM ops.alerts WHERE run_id = {r:String} "
        "AND kind = {k:String}",
        r=run_id,
        k=kind,
    )


def loader_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loader", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
        check=False,
    )


def test_a_replaced_source_collection_is_reloaded_with_its_models_in_one_run(
    pipeline: Pipeline,
) -> None:
    sync_pipeline()
    files_before = len(warehouse_state(pipeline.ch))
    # Another, smaller dataset whose documents are all dated before the stored watermark.
    seed(pipeline.db, 120, seed=99, end=datetime(2025, 6, 1, tzinfo=UTC))

    summary = sync_pipeline()

    assert summary["status"] == "ok"
    assert "was replaced" in summary["loads"]["tasks"]["source_replaced"]
    assert summary["full_refresh"] is True
    replaced = alerts_of(pipeline, summary["run_id"], "source_replaced")
    assert {a["subject"] for a in replaced} == {"tasks", "employee"}
    recorded = pipeline.scalar(
        "SELECT message FROM ops.sync_runs WHERE run_id = {r:String}",
        r=summary["loads"]["tasks"]["loader_run_id"],
    )
    assert "was replaced" in recorded
    assert len(warehouse_state(pipeline.ch)) < files_before
    assert differences_from_mongo(pipeline.db, pipeline.ch) == {}
    assert summary["in_step"].startswith("in step with MongoDB")


def test_a_bulk_delete_is_found_by_the_drift_check_and_repaired_in_the_same_run(
    pipeline: Pipeline,
) -> None:
    sync_pipeline()
    doomed = [d["_id"] for d in pipeline.db.tasks.find({}, {"_id": 1}).sort("_id", 1).limit(120)]
    pipeline.db.tasks.delete_many({"_id": {"$in": doomed}})

    summary = sync_pipeline()  # no watermark moved: only the counts tell

    assert summary["status"] == "ok"
    assert summary["changed"] == []
    assert summary["built"] == ["source:mongo.tasks+"]
    assert summary["drift"]["tasks"]["differ"] == 0
    checks = pipeline.rows(
        "SELECT collection, note FROM ops.drift_checks WHERE run_id = {r:String}",
        r=summary["run_id"],
    )
    assert {c["collection"]: c["note"].startswith("120 differed") for c in checks} == {
        "tasks": True,
        "employee": False,
    }
    assert differences_from_mongo(pipeline.db, pipeline.ch) == {}


def test_a_loader_full_refresh_leaves_no_orphan_in_any_model(pipeline: Pipeline) -> None:
    sync_pipeline()
    file_id = pipeline.db.tasks.find_one({}, sort=[("_id", 1)])["file_id"]
    pipeline.db.tasks.delete_many({"file_id": file_id})  # no tombstone will ever be written

    refreshed = loader_cli("sync", "--full-refresh")
    summary = sync_pipeline()

    assert refreshed.returncode == 0, refreshed.stderr
    assert summary["status"] == "ok" and summary["full_refresh"] is True
    assert file_id not in warehouse_state(pipeline.ch)
    assert differences_from_mongo(pipeline.db, pipeline.ch) == {}


def test_a_flow_full_refresh_leaves_no_orphan_in_any_model(pipeline: Pipeline) -> None:
    sync_pipeline()
    file_id = pipeline.db.tasks.find_one({}, sort=[("_id", -1)])["file_id"]
    pipeline.db.tasks.delete_many({"file_id": file_id})

    summary = sync_pipeline(full_refresh=True)

    assert summary["status"] == "ok" and summary["full_refresh"] is True
    assert file_id not in warehouse_state(pipeline.ch)
    assert differences_from_mongo(pipeline.db, pipeline.ch) == {}


def test_a_load_outside_the_flow_is_built_by_the_next_flow_run(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No overlap window: the flow's own read finds nothing new after the CLI's load.
    monkeypatch.setenv("LOADER_OVERLAP_SECONDS", "0")
    sync_pipeline()
    task_id = pipeline.scalar("SELECT min(task_id) FROM analytics.pipeline_state")
    pipeline.db.tasks.update_one(
        {"_id": ObjectId(task_id)},
        {"$set": {"status": "rejected", "updated_at": datetime.now(UTC)}},
    )
    loaded = loader_cli("sync")

    summary = sync_pipeline()

    assert loaded.returncode == 0, loaded.stderr
    assert summary["changed"] == []  # the CLI loaded it already
    assert summary["built"] == ["source:mongo.tasks+"]
    assert warehouse_state(pipeline.ch) == current_task_per_file(pipeline.db)


def test_a_quiet_run_says_the_warehouse_is_in_step(pipeline: Pipeline) -> None:
    sync_pipeline()

    summary = sync_pipeline()

    assert summary["status"] == "skipped"
    assert "in step with MongoDB as of" in summary["message"]


def test_a_collection_missing_from_mongo_stops_the_run_and_changes_nothing(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_pipeline()
    state = warehouse_state(pipeline.ch)
    monkeypatch.setenv("MONGO_DB", "pipline")  # a typo: no such database

    with pytest.raises(SourceMissing, match="MONGO_DB"):
        sync_pipeline()

    assert warehouse_state(pipeline.ch) == state
    assert "pipline" not in pipeline.mongo.list_database_names()
