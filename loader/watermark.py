"""The per-collection watermark `(updated_at, _id)` kept in `ops.watermarks`, and read bounds.

Late commits: a write stamped `updated_at = T` may become visible a little after T. If the
previous run started reading at R (loader clock), every write it could have missed has
`updated_at > R - overlap` (given commits lag less than `overlap`). So the next run reads from
`min(W, R - overlap)`: exactly past the watermark `(W, id)` when `W <= R - overlap` (a quiet
collection re-reads nothing), otherwise everything from `R - overlap` on (re-reads are harmless,
the raw tables deduplicate by `_id` with `updated_at` as version).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bson import MinKey, ObjectId, json_util
from bson.datetime_ms import DatetimeMS
from clickhouse_connect.driver.client import Client

from loader.cluster import configured_cluster, insert_settings, statement_payload
from loader.mapping import MAX_DATETIME64_MS, MIN_DATETIME64_MS, id_to_str
from loader.schema import WATERMARKS, mutation_target

# Lowest BSON date: with `$gte` it selects every date (and, by type bracketing, only dates).
MIN_BSON_DATE = DatetimeMS(-(2**63))


@dataclass(frozen=True)
class Watermark:
    updated_at_ms: int
    last_id: str  # ObjectId hex, or extended JSON for other id types ("" = none)
    read_started_at_ms: int

    def id_value(self) -> Any:
        if not self.last_id:
            return None
        if len(self.last_id) == 24 and ObjectId.is_valid(self.last_id):
            return ObjectId(self.last_id)
        return json_util.loads(self.last_id)

    def describe(self) -> str:
        return f"{ms_to_iso(self.updated_at_ms)} {self.last_id}".strip()

    @classmethod
    def at(cls, updated_at_ms: int, doc_id: Any, read_started_at_ms: int) -> Watermark:
        # Stored as DateTime64(3): clamp to its range (only rejected documents lie outside).
        clamped = min(max(updated_at_ms, MIN_DATETIME64_MS), MAX_DATETIME64_MS)
        last_id = id_to_str(doc_id) if clamped == updated_at_ms else ""
        return cls(clamped, last_id, read_started_at_ms)


def ms_to_iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return f"{ms}ms"


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


@dataclass(frozen=True)
class ReadBounds:
    """Which documents a run reads: `(updated_at, _id)` past `lower`, `updated_at <= upper_ms`."""

    lower_ms: int | None  # None: from the beginning
    lower_id: Any  # exclusive tie-break at `lower_ms`; None: `lower_ms` inclusive
    upper_ms: int

    def mongo_filter(self) -> dict[str, Any]:
        lower = MIN_BSON_DATE if self.lower_ms is None else DatetimeMS(self.lower_ms)
        flt: dict[str, Any] = {"updated_at": {"$gte": lower, "$lte": DatetimeMS(self.upper_ms)}}
        if self.lower_ms is not None and self.lower_id is not None:
            # Lexicographic `(updated_at, _id) > (W, id)`: excludes the watermark's document
            # itself (see `index_range` for where the scan starts).
            flt["$nor"] = [{"updated_at": lower, "_id": {"$lte": self.lower_id}}]
        return flt

    def index_range(self) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        """`min` (inclusive) and `max` (exclusive) keys of the `(updated_at, _id)` index for
        the read: the scan starts at the watermark's own key, so the many documents that
        may share its `updated_at` are not examined again on every run. Everything before
        that key in index order was read when the watermark moved past it."""
        lower = MIN_BSON_DATE if self.lower_ms is None else DatetimeMS(self.lower_ms)
        start_id = MinKey() if self.lower_id is None else self.lower_id
        end = DatetimeMS(self.upper_ms + 1)
        return [("updated_at", lower), ("_id", start_id)], [("updated_at", end), ("_id", MinKey())]


def read_bounds(
    wm: Watermark | None, overlap_seconds: float, max_future_seconds: float, now: int
) -> ReadBounds:
    upper = now + int(max_future_seconds * 1000)
    if wm is None:
        return ReadBounds(None, None, upper)
    safe = wm.read_started_at_ms - int(overlap_seconds * 1000)
    if wm.updated_at_ms <= safe:
        return ReadBounds(wm.updated_at_ms, wm.id_value(), upper)
    return ReadBounds(safe, None, upper)


def load_watermark(client: Client, collection: str) -> Watermark | None:
    """The furthest watermark saved for `collection` (see `save_watermark`)."""
    rows = client.query(
        f"SELECT toUnixTimestamp64Milli(updated_at), last_id, "
        f"toUnixTimestamp64Milli(read_started_at) FROM {WATERMARKS.qualified} "
        "WHERE collection = {c:String} "
        "ORDER BY updated_at DESC, last_id DESC, saved_at DESC LIMIT 1",
        parameters={"c": collection},
    ).result_rows
    if not rows:
        return None
    updated_at_ms, last_id, read_started_at_ms = rows[0]
    return Watermark(int(updated_at_ms), str(last_id), int(read_started_at_ms))


def save_watermark(client: Client, collection: str, wm: Watermark, run_id: str) -> None:
    """Save `wm` unless a further one is stored: the watermark never moves back.

    Two loaders on one collection each save their own progress; a slower one must not
    overwrite a newer watermark with its older one. So the row inserted is the greater of `wm`
    and the stored one by `(updated_at, last_id)`, with the `read_started_at` and run of the
    run that reached it (its overlap window is the one that protects that position). Since
    the table keeps the last *saved* row per collection once merged, and `load_watermark`
    takes the greatest of the rows not merged yet, only two saves in the same instant can
    still leave the older one (a re-read on the next run, never a loss).
    `reset_watermark` (`--full-refresh`) removes the rows, so the next save starts afresh.
    """
    sql = (
        f"INSERT INTO {WATERMARKS.qualified} "
        "(collection, updated_at, last_id, read_started_at, run_id, saved_at) "
        "SELECT {c:String}, u, id, r, run, now64(6) FROM ("
        "SELECT fromUnixTimestamp64Milli({u:Int64}, 'UTC') AS u, {id:String} AS id, "
        "fromUnixTimestamp64Milli({r:Int64}, 'UTC') AS r, {run:String} AS run "
        "UNION ALL SELECT updated_at, last_id, read_started_at, run_id "
        f"FROM {WATERMARKS.qualified} "
        "WHERE collection = {c:String}"
        # On a tie the later read start wins: that read protects more (`loader.changes`).
        ") ORDER BY u DESC, id DESC, r DESC LIMIT 1"
    )
    parameters = {
        "c": collection,
        "u": wm.updated_at_ms,
        "id": wm.last_id,
        "r": wm.read_started_at_ms,
        "run": run_id,
    }
    # A save repeated with the same values changes nothing, so dropping it as a duplicate is
    # harmless.
    dedup = insert_settings(None, WATERMARKS.qualified, statement_payload(sql, parameters))
    client.command(sql, parameters=parameters, settings=dedup)


def load_watermarks(client: Client, collection: str) -> dict[str, Watermark]:
    """The furthest watermark of each key of `collection`: its own and its shards'
    (`collection@I/N`, see `loader.shards`)."""
    rows = client.query(
        "SELECT collection, toUnixTimestamp64Milli(argMax(updated_at, (updated_at, last_id, "
        "saved_at))), argMax(last_id, (updated_at, last_id, saved_at)), "
        "toUnixTimestamp64Milli(argMax(read_started_at, (updated_at, last_id, saved_at))) "
        f"FROM {WATERMARKS.qualified} "
        "WHERE collection = {c:String} OR startsWith(collection, {p:String}) "
        "GROUP BY collection",
        parameters={"c": collection, "p": collection + "@"},
    ).result_rows
    return {str(key): Watermark(int(u), str(i), int(r)) for key, u, i, r in rows}


def reset_watermark(client: Client, collection: str) -> None:
    """Forget the watermark of `collection` and of its shards: a reload must not leave a
    shard's mark behind, which would skip everything below it."""
    client.command(
        f"DELETE FROM {mutation_target(WATERMARKS, configured_cluster())} "
        "WHERE collection = {c:String} OR startsWith(collection, {p:String})",
        parameters={"c": collection, "p": collection + "@"},
    )
