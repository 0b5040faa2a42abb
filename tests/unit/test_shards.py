"""Loader shards without servers: the `--shard I/N` spec, the watermark keys, and where a shard
with no watermark of its own starts. What the shard filter selects in MongoDB is checked
against a real server in tests/loader/test_loader_shards.py.
"""

from __future__ import annotations

import pytest

from loader.shards import (
    UNSHARDED,
    Shard,
    ShardSpecError,
    inherited_watermark,
    parse_shard,
    shard_of_key,
)
from loader.watermark import Watermark

OVERLAP_MS = 60_000
HOUR = 3_600_000
T = 1_767_268_800_000  # 2026-01-01T12:00:00Z


def wm(updated_at_ms: int, last_id: str = "65a000000000000000000000") -> Watermark:
    """A watermark whose run started reading an hour after it (outside the overlap)."""
    return Watermark(updated_at_ms, last_id, updated_at_ms + HOUR)


# -- the spec ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "shard"), [("0/4", Shard(0, 4)), (" 3 / 4 ", Shard(3, 4))])
def test_a_spec_i_of_n_parses_to_that_shard(spec: str, shard: Shard) -> None:
    assert parse_shard(spec) == shard


@pytest.mark.parametrize("spec", ["4/4", "5/4", "0/0", "1/0"])
def test_a_shard_outside_zero_to_n_minus_one_is_refused_naming_the_range(spec: str) -> None:
    with pytest.raises(ShardSpecError, match="numbered 0 to N-1"):
        parse_shard(spec)


@pytest.mark.parametrize("spec", ["", "1", "-1/4", "a/b", "1/4/2", "1.0/4"])
def test_a_spec_not_of_the_form_i_slash_n_is_refused_naming_the_form(spec: str) -> None:
    with pytest.raises(ShardSpecError, match="not of the form I/N"):
        parse_shard(spec)


# -- keys --------------------------------------------------------------------------------------
def test_one_shard_is_the_unsharded_loader_with_the_collection_as_its_key() -> None:
    assert parse_shard("0/1") == UNSHARDED
    assert UNSHARDED.key("tasks") == "tasks"
    assert UNSHARDED.mongo_filter() == {}


def test_a_shard_keeps_its_watermark_under_collection_at_i_of_n() -> None:
    assert Shard(2, 4).key("tasks") == "tasks@2/4"
    assert shard_of_key("tasks@2/4", "tasks") == Shard(2, 4)
    assert shard_of_key("tasks", "tasks") == UNSHARDED


@pytest.mark.parametrize("key", ["employee", "employee@0/2", "tasks@x", "tasks@4/4", "tasks2"])
def test_keys_of_other_collections_or_malformed_ones_belong_to_no_shard(key: str) -> None:
    assert shard_of_key(key, "tasks") is None


def test_the_shard_filter_compares_the_id_hash_modulo_n_with_i() -> None:
    expr = Shard(1, 3).mongo_filter()["$expr"]["$eq"]
    assert expr[0]["$abs"]["$mod"] == [{"$toHashedIndexKey": "$_id"}, 3]
    assert expr[1] == 1


# -- where a new shard starts ------------------------------------------------------------------
def test_a_new_shard_starts_from_the_unsharded_watermark() -> None:
    saved = {"tasks": wm(T)}
    assert inherited_watermark(saved, "tasks", OVERLAP_MS) == wm(T)


def test_with_no_watermark_at_all_a_new_shard_reads_from_the_beginning() -> None:
    assert inherited_watermark({}, "tasks", OVERLAP_MS) is None


def test_a_new_shard_starts_from_the_slowest_shard_of_a_complete_configuration() -> None:
    # Going from 2 to 4 shards: everything below the slower old shard has been read.
    saved = {"tasks@0/2": wm(T + 5 * HOUR), "tasks@1/2": wm(T + 3 * HOUR)}
    assert inherited_watermark(saved, "tasks", OVERLAP_MS) == wm(T + 3 * HOUR)


def test_an_incomplete_configuration_is_no_safe_start() -> None:
    # Shard 1/2 never ran: nothing says its documents were read, so start from the beginning.
    assert inherited_watermark({"tasks@0/2": wm(T)}, "tasks", OVERLAP_MS) is None


def test_the_furthest_complete_configuration_wins() -> None:
    saved = {
        "tasks": wm(T),  # unsharded, before sharding started
        "tasks@0/2": wm(T + 4 * HOUR),
        "tasks@1/2": wm(T + 2 * HOUR),
        "tasks@0/3": wm(T + 9 * HOUR),  # incomplete: ignored
    }
    assert inherited_watermark(saved, "tasks", OVERLAP_MS) == wm(T + 2 * HOUR)


def test_a_watermark_inside_its_runs_overlap_counts_from_the_read_start_minus_overlap() -> None:
    # Shard 0/2's mark is later, but its run started reading just after it: late commits
    # below (read start - overlap) may be unread, so that is where it is "safe" from.
    late = Watermark(T + 3 * HOUR, "65a000000000000000000001", T + 3 * HOUR + 1_000)
    saved = {"tasks@0/2": late, "tasks@1/2": wm(T + 3 * HOUR - 30_000)}
    assert inherited_watermark(saved, "tasks", OVERLAP_MS) == late
