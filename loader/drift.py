"""Drift: does the warehouse account for as many documents as MongoDB holds? (`ops.drift_checks`)

A count per collection, cheap enough for every flow run: MongoDB counts on its `_id` index, and
ClickHouse counts the live rows of `raw.<collection>` plus the ids known only from `raw.rejects`
(a rejected document is accounted for, not lost). Both sides count only documents whose
ObjectId is older than the overlap window (`LOADER_OVERLAP_SECONDS`), so inserts that landed
while the check ran, and which the next sync loads anyway, do not read as drift. Documents
with another kind of `_id` are never loaded and not counted on either side.

MongoDB's count is not taken at one instant, nor at the instant ClickHouse counts: a document
deleted in between would read as drift (and make the flow reconcile the whole collection)
although the warehouse stores its delete a moment later. So the warehouse is counted as it
stood while MongoDB counted: a tombstone stamped and stored after the count began still counts
as the document it replaced (`clickhouse_count_sql`), and the count nearest MongoDB's among
those of that span is the one compared. When they still differ while a change-stream follower
is running, the follower may not have stored the last deletes yet: the warehouse is counted
again for up to `FOLLOWER_CATCH_UP_S`.

Equal counts do not prove equal contents (a delete and a late insert cancel out), which is why
the scheduled deployment also reconciles daily; different counts prove that something differs,
and the flow then reconciles that collection in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING

from bson import ObjectId
from clickhouse_connect.driver.client import Client
from pymongo.collection import Collection

from loader.clients import Clients, clickhouse_call, insert_json_rows, mongo_call
from loader.follower import follower_running
from loader.schema import DRIFT_CHECKS, REJECTS, raw_table
from loader.watermark import now_ms

if TYPE_CHECKING:
    from loader.raw_count import CountMemo


# MongoDB stamps a delete with its clock, the loader times its count with its own.
CLOCK_MARGIN_MS = 100
# How long a difference may wait for a running follower to store the deletes it has seen.
FOLLOWER_CATCH_UP_S = 2.0
LIVE_NOW = (2**64 - 1, 2**64 - 1)  # a span no tombstone is stamped after: the live count


@dataclass(frozen=True)
class TimedCount:
    """MongoDB's count and the span (epoch ms, margins included) it was taken in."""

    count: int
    started_ms: int
    finished_ms: int

    @property
    def span(self) -> tuple[int, int]:
        return self.started_ms - CLOCK_MARGIN_MS, self.finished_ms + CLOCK_MARGIN_MS


def timed_count(
    count: Callable[[Collection, ObjectId], int], coll: Collection, cut: ObjectId
) -> TimedCount:
    started_ms = now_ms()
    return TimedCount(count(coll, cut), started_ms, now_ms())


@dataclass(frozen=True)
class Drift:
    collection: str
    mongo_count: int
    clickhouse_count: int
    counted_before: datetime  # documents whose ObjectId is older than this were counted
    checked_at: datetime

    @property
    def differ(self) -> int:
        return abs(self.mongo_count - self.clickhouse_count)

    @property
    def in_step(self) -> bool:
        return self.mongo_count == self.clickhouse_count

    def describe(self) -> str:
        when = self.checked_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if self.in_step:
            return f"{self.collection}: in step with MongoDB as of {when}"
        return (
            f"{self.collection}: {self.differ:,} documents differ as of {when} "
            f"(MongoDB {self.mongo_count:,}, warehouse {self.clickhouse_count:,})"
        )


def rejected_only_sql(collection: str) -> str:
    """(`_id`, `v` = updated_at ms of its last rejected document) of every ObjectId known only
    from `raw.rejects` and not marked gone. They are in Mongo too; leaving them out would make
    every bucket differ. Takes parameter `c`."""
    table = raw_table(collection).qualified
    rejected_updated_at = (
        "toInt64OrZero(JSONExtractString(document, 'updated_at', '$date', '$numberLong'))"
    )
    rejected = f"SELECT _id FROM {REJECTS.qualified} WHERE collection = {{c:String}}"
    return (
        f"SELECT _id, argMax({rejected_updated_at}, rejected_at) AS v "
        f"FROM {REJECTS.qualified} WHERE collection = {{c:String}} "
        "AND length(_id) = 24 AND match(_id, '^[0-9a-f]+$') "
        # Restricted to the rejected ids, so the primary key of the raw table serves it.
        f"AND _id NOT IN (SELECT _id FROM {table} WHERE _id IN ({rejected})) "
        "GROUP BY _id HAVING argMax(is_deleted, rejected_at) = 0"
    )


def clickhouse_count_sql(collection: str) -> str:
    """Documents the warehouse accounts for with an id below `cut`, as it stood at `start` and
    at `end` (epoch ms): a tombstone stamped and stored after a moment still counts as the
    document it replaced (`LIVE_NOW` for both: the live count). Takes `c`, `cut`, `start`,
    `end`."""
    table = raw_table(collection).qualified

    def live_at(moment: str) -> str:
        after = f"{{{moment}:UInt64}}"
        stored_after = f"toUnixTimestamp64Milli(_loaded_at) > {after}"
        return f"countIf(is_deleted = 0 OR (_version > {after} AND {stored_after})) + rejected"

    return (
        f"WITH (SELECT count() FROM ({rejected_only_sql(collection)}) WHERE _id < {{cut:String}})"
        f" AS rejected SELECT {live_at('start')}, {live_at('end')} "
        f"FROM {table} FINAL WHERE _id < {{cut:String}}"
    )


def clickhouse_counts(
    ch: Client, collection: str, cut: ObjectId, span: tuple[int, int] = LIVE_NOW
) -> tuple[int, int]:
    """`clickhouse_count_sql`: the counts at the start and at the end of `span`."""
    params = {"c": collection, "cut": str(cut), "start": span[0], "end": span[1]}
    row = ch.query(clickhouse_count_sql(collection), parameters=params).result_rows[0]
    return int(row[0]), int(row[1])


def measure_drift(clients: Clients, collection: str) -> Drift:
    """Count both sides now (see the module docstring)."""
    return start_counts(clients, [collection]).result()[0]


class Counts:
    """Drift counts under way (`start_counts`): MongoDB counts each collection in a thread of
    its own from the start, ClickHouse counts in `result()`, so the caller can do other work
    meanwhile (a flow run with nothing to do is mostly waiting for MongoDB's count)."""

    def __init__(
        self,
        clients: Clients,
        collections: list[str],
        *,
        estimate: bool = False,
        memo: CountMemo | None = None,
    ) -> None:
        self.clients = clients
        self.memo = memo
        self.collections = collections
        settings = clients.settings
        self.counted_before = datetime.now(UTC) - timedelta(seconds=settings.overlap_seconds)
        self.cut = ObjectId.from_datetime(self.counted_before)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(collections)))
        count = estimated_count if estimate else exact_count
        self._mongo = {
            c: self._pool.submit(
                mongo_call,
                settings,
                partial(timed_count, count, clients.db[c], self.cut),
            )
            for c in collections
        }

    def result(self) -> list[Drift]:
        settings = self.clients.settings
        ch = self.clients.clickhouse
        try:
            if self.memo is not None:  # counted while MongoDB counts: the quick look's path
                from loader.raw_count import remembered_count

                in_clickhouse = {
                    c: clickhouse_call(
                        settings, partial(remembered_count, ch, c, self.cut, self.memo)
                    )
                    for c in self.collections
                }
            in_mongo = {c: f.result() for c, f in self._mongo.items()}
        finally:
            self.cancel()
        if self.memo is None:  # as of MongoDB's count, which must have ended
            in_clickhouse = {c: self._warehouse_count(ch, c, in_mongo[c]) for c in self.collections}
        checked_at = datetime.now(UTC)
        return [
            Drift(c, in_mongo[c].count, in_clickhouse[c], self.counted_before, checked_at)
            for c in self.collections
        ]

    def _warehouse_count(self, ch: Client, collection: str, mongo: TimedCount) -> int:
        """The warehouse's count nearest MongoDB's among those it had while MongoDB counted,
        counted again while a running follower may still be storing that span's deletes."""
        settings = self.clients.settings
        deadline = time.monotonic() + FOLLOWER_CATCH_UP_S
        follower: bool | None = None  # asked once, on the first difference
        while True:
            at_start, at_end = clickhouse_call(
                settings, partial(clickhouse_counts, ch, collection, self.cut, mongo.span)
            )
            nearest = min(max(mongo.count, at_end), at_start)
            if nearest == mongo.count or time.monotonic() >= deadline:
                return nearest
            if follower is None:
                follower = clickhouse_call(settings, partial(follower_running, ch, collection))
            if not follower:
                return nearest
            time.sleep(0.2)

    def cancel(self) -> None:
        """Stop waiting (a count already running finishes in its thread)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def start_counts(
    clients: Clients,
    collections: list[str],
    *,
    estimate: bool = False,
    memo: CountMemo | None = None,
) -> Counts:
    """Count both sides; `estimate`: MongoDB's side from the collection's document count
    (`estimated_count`), for a quick first look whose disagreement the caller then checks
    with an exact count; `memo`: the warehouse's side from the last count while its raw
    table has not changed (`loader.raw_count`)."""
    return Counts(clients, collections, estimate=estimate, memo=memo)


def exact_count(coll: Collection, cut: ObjectId) -> int:
    """ObjectIds below `cut`, counted on the `_id` index (half a second at a million)."""
    # `$lt` an ObjectId selects ObjectIds only (BSON types compare within their type).
    return int(coll.count_documents({"_id": {"$lt": cut}}))


# Every BSON type an `_id` may have besides ObjectId (arrays are not allowed).
OTHER_ID_TYPES = [
    "double", "string", "object", "binData", "bool", "date", "null", "regex",
    "javascript", "int", "timestamp", "long", "decimal", "minKey", "maxKey", "symbol",
]  # fmt: skip


def estimated_count(coll: Collection, cut: ObjectId) -> int:
    """`exact_count` from the collection's document count (metadata, no scan) minus the
    documents it must not include: ObjectIds from `cut` on (the last overlap window's
    inserts, a short index range) and ids of other types (each type a range of the `_id`
    index). The metadata count can be off after an unclean shutdown, so a disagreement with
    the warehouse is only a hint: check it with `exact_count`."""
    total = coll.estimated_document_count()
    recent = coll.count_documents({"_id": {"$gte": cut}})
    other = coll.count_documents({"_id": {"$type": OTHER_ID_TYPES}})
    return int(total - recent - other)


def record_drift(clients: Clients, drift: Drift, run_id: str, note: str = "") -> None:
    row = [
        drift.checked_at,
        drift.collection,
        drift.mongo_count,
        drift.clickhouse_count,
        drift.counted_before,
        run_id,
        note,
    ]
    ch = clients.clickhouse
    clickhouse_call(
        clients.settings,
        lambda: insert_json_rows(
            ch, DRIFT_CHECKS.qualified, [n for n, _ in DRIFT_CHECKS.columns], [row]
        ),
    )


def latest_drift(client: Client, collections: list[str]) -> dict[str, Drift]:
    """The last check of each collection (none for a collection never checked)."""
    rows = client.query(
        "SELECT collection, argMax(mongo_count, checked_at), argMax(clickhouse_count, "
        "checked_at), argMax(counted_before, checked_at), max(checked_at) "
        f"FROM {DRIFT_CHECKS.qualified} WHERE collection IN {{c:Array(String)}} "
        "GROUP BY collection",
        parameters={"c": collections},
    ).result_rows
    return {r[0]: Drift(r[0], int(r[1]), int(r[2]), _utc(r[3]), _utc(r[4])) for r in rows}


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
