"""The pure parts of the `_id`-range snapshot: `--range k/N`, split points and ranges, and the
exact text form of an `_id` bound."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import bson
import pytest
from bson import Binary, Decimal128, Int64, ObjectId
from bson.datetime_ms import DatetimeMS

from loader.snapshot_ranges import (
    IdRange,
    RangeSpec,
    RangeSpecError,
    decode_id,
    encode_id,
    parse_range,
    ranges_from_points,
    split_points,
)


def test_a_range_spec_is_k_of_n() -> None:
    assert parse_range("2/4") == RangeSpec(2, 4)
    assert parse_range(" 0 / 1 ") == RangeSpec(0, 1)
    assert parse_range("1/3").label == "snapshot 1/3"


@pytest.mark.parametrize("spec", ["4/4", "-1/4", "1/0", "a/b", "1", "1/2/3", ""])
def test_a_range_outside_zero_to_n_minus_one_is_refused(spec: str) -> None:
    with pytest.raises(RangeSpecError, match="k/N|numbered 0 to N-1"):
        parse_range(spec)


def test_split_points_are_the_quantiles_of_the_sample() -> None:
    ids = list(range(100))

    assert split_points(ids, 4) == [25, 50, 75]
    assert split_points(ids, 2) == [50]
    assert split_points(ids, 1) == []


def test_a_small_sample_gives_fewer_distinct_split_points() -> None:
    assert split_points([10, 20], 4) == [20]  # positions 0 (dropped), 1, 1
    assert split_points([], 3) == []


def test_n_ranges_cover_every_key_end_to_end() -> None:
    ranges = ranges_from_points([25, 50, 75], 4)

    assert ranges == [IdRange(None, 25), IdRange(25, 50), IdRange(50, 75), IdRange(75, None)]


def test_missing_split_points_make_empty_ranges_not_fewer() -> None:
    ranges = ranges_from_points([20], 4)

    assert ranges[:2] == [IdRange(None, 20), IdRange(20, None)]
    assert ranges[2:] == [IdRange(empty=True), IdRange(empty=True)]


IDS: list[Any] = [
    ObjectId(),
    str(ObjectId()),  # a 24-hex string must not come back as an ObjectId
    "",
    0,
    Int64(2**40),
    1.5,
    Decimal128(Decimal("1.25")),
    True,
    DatetimeMS(1_700_000_000_000),
    Binary(b"\x00\x01"),
    {"a": 1},
    None,
]


@pytest.mark.parametrize("value", IDS, ids=[type(v).__name__ for v in IDS])
def test_an_id_bound_round_trips_to_the_same_bson_value(value: Any) -> None:
    back = decode_id(encode_id(value))

    # Same BSON bytes: same type and value for the index (a 24-hex string stays a string).
    assert bson.encode({"v": back}) == bson.encode({"v": value})
