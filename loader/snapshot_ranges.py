"""The pure parts of the `_id`-range snapshot (`loader.snapshot`): the `--range k/N` spec,
the choice of split points and ranges, and the exact text form of an `_id` bound."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bson import json_util

from loader.parts import parse_part

_JSON = json_util.CANONICAL_JSON_OPTIONS


class RangeSpecError(ValueError):
    """A `--range` value that is not `k/N` with 0 <= k < N."""


@dataclass(frozen=True)
class RangeSpec:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def label(self) -> str:
        """`ops.sync_runs.shard` of this range's run."""
        return f"snapshot {self}"


def parse_range(spec: str) -> RangeSpec:
    """`"k/N"` → `RangeSpec(k, N)`; a clear error naming the expected form otherwise."""
    return RangeSpec(*parse_part(spec, "range", "k", RangeSpecError))


# -- pure planning -----------------------------------------------------------------------------
def split_points(sorted_ids: Sequence[Any], workers: int) -> list[Any]:
    """N-1 split points (fewer when there are fewer distinct ids): the ids at the quantiles
    `i/N` of a sorted, duplicate-free sample, so each range holds about 1/N of it."""
    m = len(sorted_ids)
    positions = sorted({(i * m) // workers for i in range(1, workers)} - {0}) if m else []
    return [sorted_ids[p] for p in positions if p < m]


@dataclass(frozen=True)
class IdRange:
    """`_id` in `[lower, upper)`; a bound of None is open (from the lowest, to the highest
    key). An `empty` range reads nothing (fewer distinct ids than workers)."""

    lower: Any = None
    upper: Any = None
    empty: bool = False


def ranges_from_points(points: Sequence[Any], workers: int) -> list[IdRange]:
    """The `workers` ranges the split points make: consecutive, covering every key; ranges
    beyond `len(points) + 1` are empty."""
    bounds = [None, *points, None]
    ranges = [IdRange(bounds[i], bounds[i + 1]) for i in range(len(points) + 1)]
    if len(ranges) > workers:
        raise ValueError(f"{len(points)} split points make more than {workers} ranges")
    return ranges + [IdRange(empty=True)] * (workers - len(ranges))


def encode_id(value: Any) -> str:
    """Canonical extended JSON of an `_id` (exact for every BSON type; unlike `id_to_str`,
    a 24-hex string and an ObjectId stay apart)."""
    return json_util.dumps({"v": value}, json_options=_JSON)


def decode_id(text: str) -> Any:
    return json_util.loads(text, json_options=_JSON)["v"]
