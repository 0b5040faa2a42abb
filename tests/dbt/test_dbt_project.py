"""The dbt project on the test stack: build (full, then incremental), bad input, docs, lint."""

from __future__ import annotations

import json
import os

import pytest
from testkit import run_module

STAGES = ["intake", "review", "processing", "quality_check", "approval", "delivered"]


def _task_events_uuid(warehouse) -> str:
    return str(
        warehouse.scalar(
            "select uuid from system.tables where database = 'analytics' and name = 'task_events'"
        )
    )


def test_build_passes_twice_with_the_second_run_incremental(warehouse, dbt) -> None:
    from synthetic import mutate

    warehouse.seed()
    warehouse.load(full_refresh=True)
    dbt.ok("build", "--full-refresh")
    table_before = _task_events_uuid(warehouse)
    cursor = warehouse.scalar("select max(_loaded_at) from analytics.task_events")

    changed = mutate(warehouse.db, 30, seed=3)
    assert changed.updated > 0 and changed.inserted > 0
    warehouse.load()
    dbt.ok("build")

    # Same table, updated in place, and only the changed tasks were rewritten.
    assert _task_events_uuid(warehouse) == table_before
    rewritten = warehouse.scalar(
        "select count() from analytics.task_events"
        " where _loaded_at > {cursor:DateTime64(3, 'UTC')}",
        cursor=cursor,
    )
    assert rewritten == changed.updated + changed.inserted
    assert warehouse.scalar(
        "select count() from analytics.task_events"
    ) == warehouse.db.tasks.count_documents({})


def _copy_of_a_task(db, **changes):
    """A new task document like an existing one, dated now so the loader picks it up."""
    task = db.tasks.find_one({}, sort=[("_id", 1)])
    assert task is not None
    return {**{k: v for k, v in task.items() if k != "_id"}, "updated_at": _now(), **changes}


def test_unknown_stage_or_status_warns_naming_the_value_and_the_document(built, dbt) -> None:
    inserted = built.db.tasks.insert_many(
        [
            _copy_of_a_task(built.db, stage="teleport"),
            _copy_of_a_task(built.db, status="on_holiday"),
        ]
    ).inserted_ids
    built.load()
    dbt.ok("run")

    result = dbt.invoke("test", "--select", "stg_mongo__tasks")

    assert result.success  # a warning, not a failure
    warned = {name for name, status in result.statuses.items() if status == "warn"}
    assert any(name.startswith("accepted_values_named_stg_mongo__tasks") for name in warned)
    assert len(warned) == 2
    output = "\n".join(result.log)
    assert (
        "tasks.stage has values outside the accepted set: "
        f"'teleport' (1 row, ids {inserted[0]})" in output
    )
    assert (
        "tasks.status has values outside the accepted set: "
        f"'on_holiday' (1 row, ids {inserted[1]})" in output
    )


def test_unknown_stage_stays_visible_in_the_marts(built, dbt) -> None:
    # Assigned later than every other task of its file, so it is the file's current task.
    built.db.tasks.insert_one(_copy_of_a_task(built.db, stage="teleport", assigned_at=_now()))
    built.load()
    dbt.ok("run")

    assert built.rows(
        "select files from analytics.mart_backlog_by_stage where stage = 'teleport'"
    ) == [(1,)]


def test_comparison_test_catches_a_pipeline_state_that_drifted(built, dbt) -> None:
    # A candidate row that no raw task backs, written into the store behind the loader's and
    # dbt's back: pipeline_state (read live from the store) shows it, the naive recomputation
    # over raw does not.
    built.ch.command(
        "insert into analytics.pipeline_state_store"
        " select * replace ('ffffffffffffffffffffffff' as task_id,"
        " assigned_at + interval 1 year as assigned_at, rank + bitShiftLeft(toUInt256(1), 250)"
        " as rank) from analytics.pipeline_state_store final order by file_id limit 1"
    )
    drifted = dbt.invoke("test", "--select", "assert_pipeline_state_matches_naive_recomputation")
    assert drifted.statuses == {"assert_pipeline_state_matches_naive_recomputation": "fail"}

    dbt.ok("run", "--select", "task_events+", "--full-refresh")
    dbt.ok("test", "--select", "assert_pipeline_state_matches_naive_recomputation")


def test_assignee_name_comes_from_the_employee_dimension(built, dbt) -> None:
    code = built.scalar(
        "select employee_code from analytics.pipeline_state order by file_id limit 1"
    )
    built.db.employee.update_one(
        {"employee_code": code},
        {"$set": {"employee_name": "Renamed Person", "updated_at": _now()}},
    )
    built.load()
    dbt.ok("run", "--select", "mart_employees+")

    names = built.rows(
        "select distinct employee_name from analytics.pipeline_state"
        " where employee_code = {c:String}",
        c=code,
    )
    assert names == [("Renamed Person",)]
    stale = built.scalar(
        "select countIf(employee_name != 'Renamed Person') from analytics.task_events"
        " where employee_code = {c:String}",
        c=code,
    )
    assert stale > 0, "the tasks still carry the old denormalized name"


def test_sources_are_fresh_right_after_a_load(built, dbt) -> None:
    result = dbt.ok("source", "freshness")
    assert set(result.statuses.values()) == {"pass"}


def test_docs_generate_documents_every_model_and_column(built, dbt) -> None:
    dbt.ok("docs", "generate")

    manifest = json.loads((dbt.target_path / "manifest.json").read_text())
    catalog = json.loads((dbt.target_path / "catalog.json").read_text())
    assert "__overview__" in {d["name"] for d in manifest["docs"].values()}
    undocumented = []
    for unique_id, node in manifest["nodes"].items():
        if node["resource_type"] != "model":
            continue
        if not node["description"].strip():
            undocumented.append(unique_id)
        documented = {name for name, col in node["columns"].items() if col["description"].strip()}
        for column in catalog["nodes"][unique_id]["columns"]:
            if column not in documented:
                undocumented.append(f"{unique_id}.{column}")
    assert not undocumented, f"missing descriptions: {undocumented}"


def test_sqlfluff_lint_is_clean(built, dbt) -> None:
    env = {**os.environ, **dbt.env}
    lint = ("lint", "models", "tests/data", "--nofail", "--format", "json")
    report = json.loads(run_module("sqlfluff", *lint, env=env, timeout=600))
    assert report, "sqlfluff linted no files"
    problems = [
        f"{f['filepath']}:{v['start_line_no']} {v['code']} {v['description']}"
        for f in report
        for v in f["violations"]
    ]
    assert not problems, "\n".join(problems)


def _now():
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@pytest.fixture(autouse=True)
def _stages_match_the_loader() -> None:
    # The vocabulary in dbt_project.yml must be the one the source uses.
    from synthetic import STAGES as LOADER_STAGES

    assert list(LOADER_STAGES) == STAGES
