"""Odd documents never stop the flow: they flow on, flagged, and every warned data test that
stored failures becomes an alert naming collection, field, value and document ids."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from mongo_oracle import ms
from odd_documents import STATE_SQL, flagged_tasks, plant_odd_tasks

from flows.data_quality import MAX_VALUES, stored_failure_alerts
from flows.dbt_build import StoredFailures
from flows.pipeline import sync_pipeline

if TYPE_CHECKING:  # fixtures' types, from this suite's conftest.py
    from conftest import Pipeline

pytestmark = pytest.mark.timeout(900)


def data_alerts(pipeline: Pipeline, run_id: str) -> list[dict[str, Any]]:
    return pipeline.rows(
        "SELECT kind, subject, value, threshold, message FROM ops.alerts"
        " WHERE run_id = {r:String} AND kind IN ('unknown_value', 'unknown_reference',"
        " 'data_test_warning') ORDER BY subject",
        r=run_id,
    )


def test_odd_documents_flow_on_flagged_and_alerts_name_them(pipeline: Pipeline) -> None:
    from synthetic import mutate

    assert sync_pipeline()["status"] == "ok"
    assert mutate(pipeline.db, 30, seed=5).updated > 0  # valid changes beside the odd ones
    planted = plant_odd_tasks(pipeline.db)

    summary = sync_pipeline()

    assert summary["status"] == "ok"
    # The state is MongoDB's argMax per file, odd values shown as they are, and flagged.
    state = pipeline.rows(STATE_SQL)
    flagged = {
        task_id: (r["stage"], r["status"], r["employee_code"])
        for task_id, r in flagged_tasks(state, pipeline.db).items()
    }
    ids = {field: str(task_id) for field, task_id in planted.items()}
    assert flagged[ids["stage"]][0] == "archived"
    assert flagged[ids["status"]][1] == "lost"
    assert flagged[ids["employee_code"]][2] == "E-NOBODY"
    assert set(flagged) == set(ids.values())

    # One alert per odd value, naming collection, field, value and the document's id.
    alerts = data_alerts(pipeline, summary["run_id"])
    assert [(a["kind"], a["subject"], a["value"], a["threshold"]) for a in alerts] == [
        ("unknown_reference", "tasks.employee_code", 1.0, 0.0),
        ("unknown_value", "tasks.stage", 1.0, 0.0),
        ("unknown_value", "tasks.status", 1.0, 0.0),
    ]
    reference, stage, status = (a["message"] for a in alerts)
    assert stage == (
        f"tasks.stage: 1 document with a value outside the vocabulary: 'archived' "
        f"(ids {ids['stage']}); it flows on, flagged as unknown; fix the document or add the "
        "value to var('stages')"
    )
    assert "'lost'" in status and ids["status"] in status and "var('task_statuses')" in status
    assert reference == (
        "tasks.employee_code: 1 document referencing an unknown employee_code (not in "
        f"employee.employee_code): 'E-NOBODY' (ids {ids['employee_code']}); it flows on, "
        "flagged as unknown; fix the document or add 'E-NOBODY' to employee.employee_code"
    )
    assert sorted(summary["alerts"]) == sorted(a["message"] for a in alerts)
    warned = pipeline.rows(
        "SELECT step FROM ops.step_timings WHERE run_id = {r:String} AND status = 'warn'",
        r=summary["run_id"],
    )
    assert len(warned) == 3

    # Fixing the documents clears the flags and the alerts.
    now = ms(datetime.now(UTC))
    known = sorted(pipeline.db.employee.distinct("employee_code"))[0]
    fixes = {"stage": "review", "status": "done", "employee_code": known}
    for field, task_id in planted.items():
        pipeline.db.tasks.update_one(
            {"_id": task_id}, {"$set": {field: fixes[field], "updated_at": now}}
        )

    fixed = sync_pipeline()

    assert fixed["status"] == "ok"
    assert data_alerts(pipeline, fixed["run_id"]) == []
    assert (
        pipeline.scalar(
            "SELECT count() FROM analytics.pipeline_state"
            " WHERE 0 IN (is_known_stage, is_known_status, is_known_employee)"
        )
        == 0
    )


def test_stored_failures_of_another_shape_or_unreadable_still_alert(clickhouse_client) -> None:
    ch = clickhouse_client
    ch.command("CREATE DATABASE IF NOT EXISTS dq_alerts_test")
    ch.command("DROP TABLE IF EXISTS dq_alerts_test.other_shape")
    ch.command("CREATE TABLE dq_alerts_test.other_shape (a String) ENGINE = MergeTree ORDER BY a")
    ch.command("INSERT INTO dq_alerts_test.other_shape VALUES ('x'), ('y')")
    try:
        alerts = stored_failure_alerts(
            ch,
            [
                StoredFailures("odd_test", "`dq_alerts_test`.`other_shape`", 2),
                StoredFailures("gone_test", "`dq_alerts_test`.`no_such_table`", 1),
            ],
            "run-1",
        )
    finally:
        ch.command("DROP DATABASE dq_alerts_test")

    assert [(a.kind, a.subject, a.value, a.run_id) for a in alerts] == [
        ("data_test_warning", "odd_test", 2.0, "run-1"),
        ("data_test_warning", "gone_test", 1.0, "run-1"),
    ]
    assert "`dq_alerts_test`.`other_shape`" in alerts[0].message
    assert "could not be read" in alerts[1].message


def test_many_values_are_listed_up_to_the_bound_then_counted(clickhouse_client) -> None:
    ch = clickhouse_client
    ch.command("CREATE DATABASE IF NOT EXISTS dq_alerts_test")
    ch.command(
        "CREATE TABLE dq_alerts_test.many (collection String, field String, value String,"
        " n_records UInt64, example_ids Array(String), vocabulary String)"
        " ENGINE = MergeTree ORDER BY tuple()"
    )
    n = MAX_VALUES + 5
    ch.command(
        "INSERT INTO dq_alerts_test.many SELECT 'tasks', 'stage', 'v' || leftPad(toString(number),"
        " 3, '0'), 7, ['a', 'b'], 'stages' FROM numbers({n:UInt32})",
        parameters={"n": n},
    )
    try:
        alerts = stored_failure_alerts(
            ch, [StoredFailures("t", "`dq_alerts_test`.`many`", n)], "run-1"
        )
    finally:
        ch.command("DROP DATABASE dq_alerts_test")

    assert len(alerts) == MAX_VALUES + 1
    assert alerts[0].message.startswith(
        "tasks.stage: 7 documents with a value outside the vocabulary: 'v000' (ids a, b and 5 more)"
    )
    assert (alerts[-1].value, alerts[-1].subject) == (5.0, "tasks.stage")
    assert "5 more values than listed" in alerts[-1].message
