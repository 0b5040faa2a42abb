"""Odd documents flow on, flagged: a task with a stage or status outside the vocabulary, or with
an employee_code the `employee` collection lacks, is built into pipeline_state as it is, the
build goes through, and the warned tests store rows naming collection, field, value and ids."""

from __future__ import annotations

import json
from typing import Any

from odd_documents import STATE_SQL, flagged_tasks, plant_odd_tasks

FLAGS = ("stage_order", "is_known_stage", "is_known_status", "is_known_employee")


def test_odd_documents_flow_on_flagged_and_their_ids_are_stored(built, dbt) -> None:
    from synthetic import mutate

    assert mutate(built.db, 30, seed=5).updated > 0  # valid changes beside the odd ones
    planted = plant_odd_tasks(built.db)
    built.load()

    result = dbt.ok("build")

    # The build went through: three warnings, nothing failed or skipped.
    assert {n: s for n, s in result.failed().items() if s != "warn"} == {}
    warned = [n for n, s in result.statuses.items() if s == "warn"]
    assert len(warned) == 3
    assert sum(n.startswith("accepted_values_named_stg_mongo__tasks_") for n in warned) == 2
    assert sum(n.startswith("relationships_named_task_events_") for n in warned) == 1

    # The state is MongoDB's argMax, odd values included as they are, and flagged.
    result_rows = built.ch.query(STATE_SQL)
    state = [dict(zip(result_rows.column_names, r, strict=True)) for r in result_rows.result_rows]
    flagged = {
        task_id: {k: r[k] for k in FLAGS if r[k] == 0}
        for task_id, r in flagged_tasks(state, built.db).items()
    }
    assert flagged == {
        str(planted["stage"]): {"stage_order": 0, "is_known_stage": 0},
        str(planted["status"]): {"is_known_status": 0},
        str(planted["employee_code"]): {"is_known_employee": 0},
    }
    odd = {r["task_id"]: r for r in state if r["task_id"] in flagged}
    assert odd[str(planted["stage"])]["stage"] == "archived"
    assert odd[str(planted["status"])]["status"] == "lost"
    assert odd[str(planted["employee_code"])]["employee_code"] == "E-NOBODY"

    # The stored failures name collection, field, value, count and the document ids.
    stored = sorted(
        row
        for relation in stored_failure_relations(dbt.target_path)
        for row in built.rows(
            f"select collection, field, value, n_records, example_ids from {relation}"
        )
    )
    assert stored == [
        ("tasks", "employee_code", "E-NOBODY", 1, [str(planted["employee_code"])]),
        ("tasks", "stage", "archived", 1, [str(planted["stage"])]),
        ("tasks", "status", "lost", 1, [str(planted["status"])]),
    ]


def stored_failure_relations(target_path: Any) -> list[str]:
    """The stored-failures relation of every test of the last invocation that warned."""
    run = json.loads((target_path / "run_results.json").read_text())
    return [r["relation_name"] for r in run["results"] if r["status"] == "warn"]
