"""Loader shards: `--shard I/N` loads only the documents whose `_id` hashes to I modulo N.

The hash is evaluated by MongoDB inside the read (`$expr`), so a shard reads only its share
off the watermark index and N workers together read each document exactly once. It must be
defined for every `_id` the loader accepts (any BSON type) and give the same answer on every
run. MongoDB 6.0 has no `$toHashedIndexKey` (7.0), so the key is built from the id itself:

- ObjectId: its last four hex digits (the low bits of the insert counter, which cycle through
  every value as documents are inserted), read as a number;
- string: its last four characters, each looked up in a 64-character alphabet (others count
  as 64), read as a base-65 number, plus its length;
- anything convertible to a long (ints, longs, doubles, decimals, dates, booleans): that long;
- anything else (objects, arrays, binary, null, ...): 0, i.e. shard 0. Defined, if unbalanced:
  such ids are rare, and a key that never changes is what keeps the shards disjoint.

Each shard keeps its own watermark under `shard_key` (`tasks@I/N`); `inherited_watermark`
says where a shard without one starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client

from loader.watermark import Watermark, load_watermark, load_watermarks

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
HEX = "0123456789abcdef"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
KEY_SEPARATOR = "@"


class ShardSpecError(ValueError):
    """A `--shard` value that is not `I/N` with 0 <= I < N."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardSpecError(
                f"shard {self.index}/{self.count} does not exist: shards of N are numbered "
                f"0 to N-1 (for 4 workers run --shard 0/4, 1/4, 2/4 and 3/4)"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def sharded(self) -> bool:
        """False for 0/1: one shard is the unsharded loader, with its watermark and reads."""
        return self.count > 1

    def key(self, collection: str) -> str:
        """The watermark key: the collection itself unsharded, else `collection@I/N`."""
        return f"{collection}{KEY_SEPARATOR}{self}" if self.sharded else collection

    def mongo_filter(self) -> dict[str, Any]:
        """The `$expr` selecting this shard's documents (empty when unsharded)."""
        if not self.sharded:
            return {}
        return {"$expr": {"$eq": [{"$mod": [id_hash(), self.count]}, self.index]}}


UNSHARDED = Shard(0, 1)


def parse_shard(spec: str) -> Shard:
    """`"I/N"` → `Shard(I, N)`; a clear error naming the expected form otherwise."""
    match = _SPEC.match(spec)
    if not match:
        raise ShardSpecError(
            f"--shard {spec!r} is not of the form I/N (shard I of N, 0 <= I < N, e.g. 0/4)"
        )
    return Shard(int(match.group(1)), int(match.group(2)))


def _digit(char: Any, alphabet: str, missing: int) -> dict[str, Any]:
    """Position of `char` in `alphabet`, `missing` when absent (or when `char` is '')."""
    pos = {"$indexOfCP": [alphabet, char]}
    return {"$cond": [{"$gte": [pos, 0]}, pos, missing]}


def _last_chars(text: Any, n: int, alphabet: str, base: int) -> dict[str, Any]:
    """The last `n` characters of `text` read as a number in `base` (positions in
    `alphabet`); a shorter string is padded on the left with the "missing" digit."""
    length = {"$strLenCP": text}
    terms = []
    for i in range(n):  # i = 0 is the last character
        start = {"$subtract": [length, i + 1]}
        char = {"$cond": [{"$gte": [start, 0]}, {"$substrCP": [text, start, 1]}, ""]}
        terms.append({"$multiply": [_digit(char, alphabet, base - 1), base**i]})
    return {"$add": terms}


def id_hash() -> dict[str, Any]:
    """A non-negative long computed from `$_id` (see the module docstring)."""
    oid_hex = {"$toString": "$_id"}
    as_long = {"$convert": {"input": "$_id", "to": "long", "onError": 0, "onNull": 0}}
    return {
        "$switch": {
            "branches": [
                {
                    "case": {"$eq": [{"$type": "$_id"}, "objectId"]},
                    "then": _last_chars(oid_hex, 4, HEX, 16),
                },
                {
                    "case": {"$eq": [{"$type": "$_id"}, "string"]},
                    "then": {
                        "$add": [
                            _last_chars("$_id", 4, ALPHABET, len(ALPHABET) + 1),
                            {"$strLenCP": "$_id"},
                        ]
                    },
                },
            ],
            # Negative numbers: `$mod` keeps the sign, so take the absolute value of the
            # remainder by a large odd modulus first (`$abs` of the lowest long fails).
            "default": {"$abs": {"$mod": [as_long, 1_000_000_007]}},
        }
    }


def shard_of_key(key: str, collection: str) -> Shard | None:
    """The shard a watermark key belongs to: `UNSHARDED` for the collection itself, None for
    another collection's key or a malformed one."""
    if key == collection:
        return UNSHARDED
    prefix = collection + KEY_SEPARATOR
    if not key.startswith(prefix):
        return None
    try:
        return parse_shard(key[len(prefix) :])
    except ShardSpecError:
        return None


def _effective_start(wm: Watermark, overlap_ms: int) -> tuple[int, str]:
    """Where a run from `wm` starts reading (see `watermark.read_bounds`): the watermark, or
    its run's read start minus the overlap when that is earlier (late commits)."""
    safe = wm.read_started_at_ms - overlap_ms
    if wm.updated_at_ms <= safe:
        return (wm.updated_at_ms, wm.last_id)
    return (safe, "")


def inherited_watermark(
    saved: dict[str, Watermark], collection: str, overlap_ms: int
) -> Watermark | None:
    """Where a shard with no watermark of its own starts.

    A configuration (unsharded, or N shards) whose every shard has a watermark has read, in
    all, every document below the least of its shards' read starts: that point is safe to
    start from (nothing below it is skipped). The furthest such point is taken, so changing
    N does not reload the collection: it re-reads only what lies past the slowest shard of
    the previous configuration, which the raw tables' ReplacingMergeTree (version
    `updated_at`) makes harmless. None (read from the beginning) when no configuration is
    complete.
    """
    by_count: dict[int, dict[int, Watermark]] = {}
    for key, wm in saved.items():
        shard = shard_of_key(key, collection)
        if shard is not None:
            by_count.setdefault(shard.count, {})[shard.index] = wm
    safe_points = [
        min(shards.values(), key=lambda wm: _effective_start(wm, overlap_ms))
        for count, shards in by_count.items()
        if len(shards) == count
    ]
    if not safe_points:
        return None
    return max(safe_points, key=lambda wm: _effective_start(wm, overlap_ms))


def start_watermark(
    client: Client, collection: str, shard: Shard, overlap_ms: int
) -> Watermark | None:
    """The watermark a run of `shard` starts from: its own; for a shard without one, the
    `inherited_watermark`. Unsharded, exactly the collection's own (`load_watermark`)."""
    if not shard.sharded:
        return load_watermark(client, collection)
    saved = load_watermarks(client, collection)
    own = saved.get(shard.key(collection))
    return own if own is not None else inherited_watermark(saved, collection, overlap_ms)
