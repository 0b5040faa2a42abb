"""The harness itself: each scenario starts from empty databases, each kind of divergence
between MongoDB and ClickHouse is counted, and the loader announces every fault point the
scenarios inject their faults at."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from bson import ObjectId
from harness import compare_raw, compare_task_events, dbt_build
from world import PHASES, LoaderProcess, World, emptied_world


def loaded(world: World) -> World:
    world.seed(200)
    world.sync("tasks")
    return world


def test_a_scenario_world_starts_with_both_sides_empty(world: World, tmp_path: Path) -> None:
    loaded(world)

    with emptied_world(world.stack, tmp_path) as next_scenario:
        left_in_clickhouse = next_scenario.ch.command(
            "SELECT count() FROM system.databases WHERE name IN ('raw', 'ops', 'analytics')"
        )
        left_in_mongo = next_scenario.db.list_collection_names()

    assert (left_in_clickhouse, left_in_mongo) == (0, [])


def test_in_step_collection_compares_clean(world: World) -> None:
    comparison = compare_raw(world.ch, loaded(world).truth(), "tasks")

    assert comparison.ok and comparison.checked == 200


def test_document_not_yet_loaded_counts_as_lost(world: World) -> None:
    loaded(world)
    now = datetime.now(UTC)
    world.db.tasks.insert_one(
        {
            "_id": ObjectId(),
            **{k: "x" for k in ("file_id", "stage", "employee_code", "employee_name", "status")},
            "assigned_at": now,
            "updated_at": now,
        }
    )

    assert compare_raw(world.ch, world.truth(), "tasks").lost == 1


def test_changed_value_counts_as_mismatched(world: World) -> None:
    loaded(world)
    world.db.tasks.update_one({}, {"$set": {"status": "changed-behind-the-loader"}})

    assert compare_raw(world.ch, world.truth(), "tasks").mismatched == 1


def test_delete_not_reflected_counts_as_not_deleted(world: World) -> None:
    loaded(world)
    world.db.tasks.delete_one({})

    assert compare_raw(world.ch, world.truth(), "tasks").not_deleted == 1


def test_task_twice_in_task_events_counts_as_duplicate(world: World, tmp_path: Path) -> None:
    loaded(world).sync("employee")
    dbt_build(world.env, tmp_path / "dbt")
    # task_events is a plain MergeTree: a second copy of a row stays a second row.
    world.ch.command(
        "INSERT INTO analytics.task_events SELECT * FROM analytics.task_events LIMIT 1"
    )

    assert compare_task_events(world.ch, world.truth()).duplicates == 1


def test_refused_document_missing_from_rejects_counts_as_lost(world: World) -> None:
    loaded(world)
    world.db.tasks.insert_one({"_id": ObjectId(), "file_id": None})

    assert compare_raw(world.ch, world.truth(), "tasks").lost == 1


@pytest.mark.parametrize("decoder", ["pymongoarrow", "pymongo"])
def test_every_fault_point_of_every_batch_is_announced_on_each_decoder_path(
    world: World, decoder: str
) -> None:
    """The scenarios inject their faults at these announcements: one that a decoder path never
    makes would let a scenario run without its fault."""
    world.seed(1_000)
    loader = LoaderProcess(world, 300, extra_env={"LOADER_DECODER": decoder})
    try:
        status = loader.finish()
        stderr = loader.stderr()
    finally:
        loader.close()

    assert status == 0, stderr[-2000:]
    announced = [line for line in loader.lines if not line.startswith("done ")]
    assert announced == [f"{phase} {n}" for n in range(1, 5) for phase in PHASES]


def test_a_paused_loader_waits_at_its_fault_point_until_resumed(world: World) -> None:
    world.seed(1_000)
    loader = LoaderProcess(world, 300, pause_at=("insert", 2))
    try:
        loader.wait_for("insert 2")
        paused = world.ch.command("SELECT count() FROM raw.tasks")
        assert loader.alive()
        loader.resume()
        status = loader.finish()
    finally:
        loader.close()

    assert (paused, status) == (300, 0)
    assert world.ch.command("SELECT count() FROM raw.tasks") == 1_000
