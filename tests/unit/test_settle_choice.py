"""How the follower's settle judges `pipeline_state_recomputed` (`loader.state.Recomputation`):
the same rules a build's settle applies in SQL (`pipeline_state_best_rows`,
`pipeline_state_superseded` in macros/pipeline_state.sql)."""

from __future__ import annotations

from typing import Any

from loader.state import RECOMPUTED_COLUMNS, Recomputation


def rank(assigned: int, task: int, version: int) -> int:
    """A rank as `pipeline_state_rank` packs it (the ObjectId bits stand in for the task)."""
    return (assigned << 160) | (task << 64) | version


def current(
    task: int, file_id: str, assigned: int, version: int, *, deleted: bool = False
) -> tuple[Any, ...]:
    row = {
        "kind": "current",
        "file_id": file_id,
        "rank": rank(assigned, task, version),
        "stage": "intake",
        "employee_code": "E1",
        "employee_name": "One",
        "status": "assigned",
        "assigned_at": assigned,
        "task_id": f"t{task}",
        "is_deleted": int(deleted),
        "_version": version,
    }
    return tuple(row[c] for c in RECOMPUTED_COLUMNS)


def touched(file_id: str) -> tuple[Any, ...]:
    return tuple({"kind": "touched", "file_id": file_id}.get(c, 0) for c in RECOMPUTED_COLUMNS)


def judge(*rows: tuple[Any, ...]) -> Recomputation:
    """The rows of a recomputation of file F."""
    return Recomputation.from_rows([touched("F"), *rows])


def held(task: int, file_id: str, assigned: int, version: int) -> tuple[Any, ...]:
    values = {"kind": "held", "file_id": file_id, "rank": rank(assigned, task, version)}
    values["task_id"] = f"t{task}"
    return tuple(values.get(c, 0) for c in RECOMPUTED_COLUMNS)


def test_the_best_row_is_the_top_ranked_live_version_in_the_file() -> None:
    rows = [current(1, "F", 10, 1), current(2, "F", 20, 1), current(3, "F", 30, 1, deleted=True)]
    judged = judge(*rows)
    assert judged.best["F"][-1] == "t2"


def test_a_task_now_in_another_file_is_no_candidate_of_this_one() -> None:
    judged = judge(current(1, "G", 10, 2))
    assert judged.best == {}


def test_a_held_row_of_a_deleted_task_is_superseded() -> None:
    rows = [current(1, "F", 10, 2, deleted=True), held(1, "F", 10, 1)]
    assert judge(*rows).superseded == {("F", rank(10, 1, 1))}


def test_a_held_row_of_an_older_version_or_of_a_task_moved_away_is_superseded() -> None:
    rows = [
        current(1, "F", 10, 5),
        held(1, "F", 30, 4),  # assigned_at moved back since
        current(2, "G", 10, 5),
        held(2, "F", 10, 3),  # moved to G since
    ]
    judged = judge(*rows)
    assert judged.superseded == {("F", rank(30, 1, 4)), ("F", rank(10, 2, 3))}


def test_the_held_row_of_the_current_version_is_not_superseded() -> None:
    rows = [current(1, "F", 10, 5), held(1, "F", 10, 5)]
    assert judge(*rows).superseded == set()


def test_a_held_row_newer_than_what_raw_showed_is_not_superseded() -> None:
    """Stored while the view read: raw's current version is older than the row."""
    rows = [current(1, "F", 10, 5), held(1, "F", 10, 6), held(2, "F", 40, 1)]
    judged = judge(*rows)
    assert judged.superseded == set()
    assert judged.held == [("F", rank(10, 1, 6)), ("F", rank(40, 2, 1))]


def test_the_files_are_those_the_view_touched() -> None:
    judged = Recomputation.from_rows([touched("F"), touched("G"), current(1, "F", 10, 1)])
    assert judged.files == ["F", "G"]
    assert set(judged.best) == {"F"}
