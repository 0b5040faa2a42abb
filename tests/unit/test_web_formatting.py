"""How the web dashboard words ages and orders stages (`web/views.py`), without servers."""

from __future__ import annotations

import pytest

from web.views import STAGES, age_since, fmt_age, stage_order


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (0, "under 1 min"),
        (59.9, "under 1 min"),
        (60, "1 min"),
        (3_599, "59 min"),
        (3_600, "1 h"),
        (3_660, "1 h 1 min"),
        (86_399, "23 h 59 min"),
        (86_400, "1 d"),
        (90_000, "1 d 1 h"),
        (86_400 * 40 + 3_599, "40 d"),
    ],
)
def test_an_age_is_said_in_its_two_largest_units(seconds: float, said: str) -> None:
    assert fmt_age(seconds) == said


def test_a_negative_age_from_clock_skew_reads_as_under_a_minute() -> None:
    assert fmt_age(-30) == "under 1 min"


def test_an_unknown_age_is_blank() -> None:
    assert fmt_age(None) == ""


def test_the_age_of_a_missing_time_is_blank() -> None:
    assert age_since(None, 1_767_268_800_000) == ""


def test_the_age_since_a_time_counts_milliseconds_to_now() -> None:
    assert age_since(1_767_268_800_000 - 5_400_000, 1_767_268_800_000) == "1 h 30 min"


def test_stages_are_numbered_from_one_in_their_order() -> None:
    assert [stage_order(s) for s in STAGES] == list(range(1, len(STAGES) + 1))


def test_a_stage_outside_the_vocabulary_is_numbered_zero() -> None:
    assert stage_order("archived") == 0
