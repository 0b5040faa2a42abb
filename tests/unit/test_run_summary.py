"""The lines `python -m flows.pipeline` prints: what a reader needs to trust the run."""

from __future__ import annotations

from typing import Any

from flows.summary import short_summary

BASE: dict[str, Any] = {"status": "ok", "duration_s": 1.0, "run_id": "r", "in_step": "in step"}


def test_a_repair_by_reconcile_is_named_with_its_counts() -> None:
    repairs = {"tasks": {"tombstones": 2486, "rows_loaded": 3, "rejects": 0}}

    text = short_summary(BASE | {"repairs": repairs})

    assert "repaired by reconcile: tasks 2,486 deleted in MongoDB, 3 rows reloaded" in text


def test_a_reconcile_that_found_nothing_adds_no_line() -> None:
    repairs = {"tasks": {"tombstones": 0, "rows_loaded": 0, "rejects": 0}}

    assert "repaired" not in short_summary(BASE | {"repairs": repairs})
