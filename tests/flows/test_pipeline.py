"""sync_pipeline on the real stack under Prefect's test harness."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from testkit import flow_runs_meeting_at_the_lock

from flows.pipeline import sync_pipeline
from synthetic import mutate

if TYPE_CHECKING:  # fixtures' types, from this suite's conftest.py
    from conftest import Pipeline
    from testkit import Captured

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


def steps_of(pipeline: Pipeline, run_id: str) -> dict[str, dict[str, Any]]:
    rows = pipeline.rows(
        "SELECT step, kind, status, duration_s, rows, message FROM ops.step_timings"
        " WHERE run_id = {r:String}",
        r=run_id,
    )
    return {r["step"]: r for r in rows}


def test_full_run_loads_builds_and_records_timings(pipeline: Pipeline) -> None:
    summary = sync_pipeline()

    assert summary["status"] == "ok"
    assert summary["changed"] == ["tasks", "employee"]
    loaded = pipeline.scalar("SELECT count() FROM raw.tasks FINAL")
    assert loaded == pipeline.db.tasks.count_documents({})
    files = pipeline.db.tasks.distinct("file_id")
    assert pipeline.scalar("SELECT count() FROM analytics.pipeline_state") == len(files)
    steps = steps_of(pipeline, summary["run_id"])
    for step in ("guard", "detect_changes", "load:tasks", "load:employee", "dbt_build"):
        assert steps[step]["status"] == "ok", step
    assert steps["load:tasks"]["rows"] == loaded
    assert "dbt:model:pipeline_state" in steps
    assert {s["step"] for s in summary["steps"]} == set(steps)


def test_full_run_publishes_a_timings_artifact(pipeline: Pipeline) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = sync_pipeline()

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sync-pipeline-timings"]))
        )
    mine = [a for a in artifacts if str(a.flow_run_id) == summary["run_id"]]
    assert len(mine) == 1
    assert "dbt:model:pipeline_state" in str(mine[0].data)


def test_immediate_second_run_is_skipped(pipeline: Pipeline) -> None:
    sync_pipeline()

    summary = sync_pipeline()

    assert summary["status"] == "skipped"
    recorded = pipeline.rows(
        "SELECT collection, status, message FROM ops.sync_runs WHERE run_id = {r:String}",
        r=summary["run_id"],
    )
    assert {r["collection"] for r in recorded} == {"tasks", "employee"}
    assert {r["status"] for r in recorded} == {"skipped"}
    assert all("no changes" in r["message"] for r in recorded)


def test_run_after_an_update_processes_just_that_change(pipeline: Pipeline) -> None:
    from bson import ObjectId

    sync_pipeline()
    task_id = pipeline.scalar(
        "SELECT min(task_id) FROM analytics.pipeline_state WHERE status = 'assigned'"
    )
    pipeline.db.tasks.update_one(
        {"_id": ObjectId(task_id)},
        {"$set": {"status": "in_progress", "updated_at": datetime.now(UTC)}},
    )

    summary = sync_pipeline()

    assert summary["status"] == "ok"
    assert summary["changed"] == ["tasks"]
    assert set(summary["loads"]) == {"tasks"}
    assert summary["built"] == ["source:mongo.tasks+"]
    assert 1 <= summary["loads"]["tasks"]["rows_written"] < pipeline.db.tasks.count_documents({})
    status = pipeline.scalar(
        "SELECT status FROM analytics.pipeline_state WHERE task_id = {t:String}", t=task_id
    )
    assert status == "in_progress"


def test_an_incremental_build_runs_only_the_alerting_tests_and_a_reconcile_run_every_test(
    pipeline: Pipeline,
) -> None:
    def tests_run(run_id: str) -> set[str]:
        return {s for s in steps_of(pipeline, run_id) if s.startswith("dbt:test:")}

    sync_pipeline()
    mutate(pipeline.db, 5, seed=11, now=datetime.now(UTC))
    incremental = sync_pipeline()
    mutate(pipeline.db, 5, seed=12, now=datetime.now(UTC))
    reconciling = sync_pipeline(reconcile=True)

    few, every = tests_run(incremental["run_id"]), tests_run(reconciling["run_id"])
    assert "dbt:model:task_events" in steps_of(pipeline, incremental["run_id"])
    # The tests that store their failures (data-quality alerts) are the named ones.
    assert few and all("_named_" in t for t in few)
    assert few < every


def test_reconcile_run_repairs_an_update_that_moved_updated_at_backwards(
    pipeline: Pipeline,
) -> None:
    from datetime import timedelta

    sync_pipeline()
    doc = pipeline.db.tasks.find_one({}, sort=[("updated_at", -1)])
    pipeline.db.tasks.update_one(
        {"_id": doc["_id"]},
        {"$set": {"status": "rejected", "updated_at": doc["updated_at"] - timedelta(days=3)}},
    )
    # Below the watermark and the counts are equal: only a full comparison can see it.
    assert sync_pipeline()["status"] == "skipped"

    summary = sync_pipeline(reconcile=True)

    assert summary["status"] == "ok"
    assert summary["built"] == ["source:mongo.tasks+"]
    steps = steps_of(pipeline, summary["run_id"])
    assert "reconciled" in steps["check_drift"]["message"]
    status = pipeline.scalar(
        "SELECT status FROM analytics.task_events WHERE task_id = {t:String}", t=str(doc["_id"])
    )
    assert status == "rejected"


def test_reconcile_run_with_nothing_to_repair_builds_nothing(pipeline: Pipeline) -> None:
    sync_pipeline()

    summary = sync_pipeline(reconcile=True)

    assert (summary["status"], summary["built"]) == ("skipped", [])
    assert "in step with MongoDB" in summary["message"]


def test_a_run_started_while_another_holds_the_lock_is_skipped_naming_it(
    pipeline: Pipeline,
) -> None:
    def more_work(attempt: int) -> None:
        mutate(pipeline.db, count=20, seed=100 + attempt)

    first, second = flow_runs_meeting_at_the_lock(
        sync_pipeline, pipeline.settings, pipeline.ch, more_work
    )

    assert (first["status"], second["status"]) == ("ok", "skipped")
    assert f"another run holds the lock ({first['run_id']})" in second["message"]
    recorded = pipeline.rows(
        "SELECT DISTINCT status, message FROM ops.sync_runs WHERE run_id = {r:String}",
        r=second["run_id"],
    )
    assert [r["status"] for r in recorded] == ["skipped"]
    assert "another run holds the lock" in recorded[0]["message"]


def test_cache_returns_the_new_numbers_right_after_a_sync(pipeline: Pipeline) -> None:
    from flows.dashboard import PANELS, collect
    from flows.redis_link import RedisLink

    panel = tuple(p for p in PANELS if p.name == "files_by_stage_status")
    log = logging.getLogger("test")
    sync_pipeline()
    link = RedisLink(pipeline.settings, log)
    collect(pipeline.settings, link, pipeline.ch, log, panel)
    before = collect(pipeline.settings, link, pipeline.ch, log, panel)[0]
    assert before.hit
    mutate(pipeline.db, count=40, seed=3)

    sync_pipeline()

    after = collect(pipeline.settings, link, pipeline.ch, log, panel)[0]
    fresh = pipeline.rows(panel[0].sql)
    assert not after.hit
    assert after.rows != before.rows
    assert [(r["stage"], r["status"], r["files"]) for r in after.rows] == [
        (r["stage"], r["status"], r["files"]) for r in fresh
    ]


def test_flow_completes_with_redis_stopped_and_warns_once(
    pipeline: Pipeline, run_logs: Captured
) -> None:
    pipeline.stack.kill("redis")
    try:
        summary = sync_pipeline()
    finally:
        pipeline.stack.start("redis")

    assert summary["status"] == "ok"
    assert summary["guard"] == "prefect-concurrency-limit"
    warnings = [m for m in run_logs.messages(logging.WARNING) if "Redis" in m]
    assert len(warnings) == 1, warnings


def test_crossed_threshold_writes_an_alert_and_a_warning(
    pipeline: Pipeline, run_logs: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_ALERT_SYNC_SECONDS", "0")

    summary = sync_pipeline()

    alerts = pipeline.rows(
        "SELECT kind, threshold FROM ops.alerts WHERE run_id = {r:String}", r=summary["run_id"]
    )
    assert alerts == [{"kind": "sync_duration", "threshold": 0.0}]
    assert any(m.startswith("ALERT sync_duration") for m in run_logs.messages(logging.WARNING))


def broken_project(tmp_path: Path) -> Path:
    """A copy of the dbt project with one model downstream of the tasks source that fails in
    ClickHouse (unknown column)."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dbt_project.yml", project)
    for folder in ("models", "macros", "tests/data", "tests/generic"):
        if (REPO / folder).exists():
            shutil.copytree(REPO / folder, project / folder)
    (project / "models" / "marts" / "broken_backlog.sql").write_text(
        "select stage, no_such_column from {{ ref('stg_mongo__tasks') }}\n"
    )
    return project


def test_failing_dbt_model_fails_the_flow_naming_it(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_DBT_PROJECT_DIR", str(broken_project(tmp_path)))
    monkeypatch.setenv("PIPELINE_DBT_TARGET_PATH", str(tmp_path / "target"))

    with pytest.raises(Exception, match="broken_backlog") as failure:
        sync_pipeline()

    assert "no_such_column" in str(failure.value)  # ClickHouse's own message
    # The load landed and its watermark advanced: nothing is left to load.
    from loader.changes import has_changes

    assert not has_changes(pipeline.loader_settings, "tasks")


def test_run_after_a_failed_build_retries_the_build(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_DBT_PROJECT_DIR", str(broken_project(tmp_path)))
    monkeypatch.setenv("PIPELINE_DBT_TARGET_PATH", str(tmp_path / "target"))
    with pytest.raises(Exception, match="broken_backlog"):
        sync_pipeline()
    monkeypatch.delenv("PIPELINE_DBT_PROJECT_DIR")
    monkeypatch.setenv("PIPELINE_DBT_TARGET_PATH", str(tmp_path / "target-fixed"))

    summary = sync_pipeline()

    assert summary["status"] == "ok"
    assert summary["changed"] == []
    assert summary["built"] == ["source:mongo.employee+", "source:mongo.tasks+"]
    assert pipeline.scalar("SELECT count() FROM analytics.pipeline_state") > 0


def test_dashboard_shows_every_panel_after_a_sync(pipeline: Pipeline) -> None:
    from flows.dashboard import PANELS, collect
    from flows.redis_link import RedisLink

    log = logging.getLogger("test")
    sync_pipeline()

    panels = collect(pipeline.settings, RedisLink(pipeline.settings, log), pipeline.ch, log)

    assert [p.query.name for p in panels] == [p.name for p in PANELS]
    for panel in panels:
        assert panel.rows, panel.query.name
        assert "error" not in panel.rows[0], panel.rows[0]


def test_loader_shards_snapshot_by_range_then_load_as_mapped_tasks_and_match_mongo(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bson import ObjectId

    monkeypatch.setenv("PIPELINE_LOADER_SHARDS", "2")
    first = sync_pipeline()
    task_id = pipeline.scalar("SELECT min(task_id) FROM analytics.pipeline_state")
    pipeline.db.tasks.update_one(
        {"_id": ObjectId(task_id)}, {"$set": {"status": "done", "updated_at": datetime.now(UTC)}}
    )

    second = sync_pipeline()
    third = sync_pipeline()

    assert first["status"] == second["status"] == "ok"

    def shards_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
        run_ids = summary["loads"]["tasks"]["loader_run_id"].split(",")
        return pipeline.rows(
            "SELECT shard, docs_read FROM ops.sync_runs WHERE run_id IN {r:Array(String)} "
            "AND status = 'ok' ORDER BY shard",
            r=run_ids,
        )

    # Never loaded: the first run loads by _id range, each range a share; then hash shards.
    snapshot = shards_of(first)
    assert [r["shard"] for r in snapshot] == ["snapshot 0/2", "snapshot 1/2"]
    assert all(r["docs_read"] > 0 for r in snapshot)
    assert [r["shard"] for r in shards_of(second)] == ["0/2", "1/2"]
    assert second["loads"]["tasks"]["docs_read"] == 1  # the changed task, once
    # Nothing changed since: the probe asks the shards' marks and skips the load.
    assert third["changed"] == []
    assert pipeline.scalar("SELECT count() FROM raw.tasks FINAL") == (
        pipeline.db.tasks.count_documents({})
    )
    status = pipeline.scalar(
        "SELECT status FROM analytics.pipeline_state WHERE task_id = {t:String}", t=task_id
    )
    assert status == "done"


def test_a_bulk_delete_is_repaired_and_said_in_the_summary(pipeline: Pipeline) -> None:
    from flows.summary import short_summary

    sync_pipeline()
    deleted = pipeline.db.tasks.delete_many({"stage": "review"}).deleted_count
    assert deleted > 0

    summary = sync_pipeline()

    assert summary["repairs"]["tasks"]["tombstones"] == deleted
    assert f"tasks {deleted:,} deleted in MongoDB" in short_summary(summary)
    live = pipeline.scalar("SELECT count() FROM analytics.task_events WHERE is_deleted = 0")
    assert live == pipeline.db.tasks.count_documents({})
