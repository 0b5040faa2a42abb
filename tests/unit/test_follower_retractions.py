"""Which change events make the follower settle their documents' files
(`loader.follower._may_retract`)."""

from __future__ import annotations

from typing import Any

from loader.follower import _may_retract


def _update(updated: dict[str, Any], removed: list[str] | None = None) -> dict[str, Any]:
    description = {"updatedFields": updated, "removedFields": removed or []}
    return {"operationType": "update", "updateDescription": description}


def test_a_status_change_or_a_reassignment_needs_no_settle() -> None:
    assert not _may_retract(_update({"status": "done", "updated_at": 1}))
    assert not _may_retract(_update({"employee_code": "E1", "employee_name": "A", "updated_at": 1}))


def test_a_move_to_another_file_or_a_new_assigned_at_needs_a_settle() -> None:
    assert _may_retract(_update({"file_id": "F2", "updated_at": 1}))
    assert _may_retract(_update({"assigned_at": 0, "updated_at": 1}))
    assert _may_retract(_update({"updated_at": 1}, removed=["assigned_at"]))


def test_an_insert_needs_no_settle() -> None:
    assert not _may_retract({"operationType": "insert"})


def test_deletes_replacements_and_updates_without_a_description_need_a_settle() -> None:
    assert _may_retract({"operationType": "delete"})
    assert _may_retract({"operationType": "replace"})
    assert _may_retract({"operationType": "update"})
