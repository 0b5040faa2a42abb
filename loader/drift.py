"""Drift: does the warehouse account for as many documents as MongoDB holds? (`ops.drift_checks`)

A count per collection, cheap enough for every flow run: MongoDB counts on its `_id` index, and
ClickHouse counts the live rows of `raw.<collection>` plus the ids known only from `raw.rejects`
(a rejected document is accounted for, not lost). Both sides count only documents whose
ObjectId is older than the overlap window (`LOADER_OVERLAP_SECONDS`), so inserts that landed
while the check ran, and which the next sync loads anyway, do not read as drift. Documents
with another kind of `_id` are never loaded and not counted on either side.

Equal counts do not prove equal contents (a delete and a late insert cancel out), which is why
the scheduled deployment also reconciles daily; different counts prove that something differs,
and the flow then reconciles that collection in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bson import ObjectId
from clickhouse_connect.driver.client import Client

from loader.clients import Clients, clickhouse_call, mongo_call
from loader.reconcile import rejected_only_sql
from loader.schema import DRIFT_CHECKS, raw_table


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


def clickhouse_count_sql(collection: str) -> str:
    """Documents the warehouse accounts for with an id below `cut`. Takes `c` and `cut`."""
    table = raw_table(collection).qualified
    return (
        f"SELECT (SELECT count() FROM {table} FINAL WHERE is_deleted = 0 AND _id < {{cut:String}})"
        f" + (SELECT count() FROM ({rejected_only_sql(collection)}) WHERE _id < {{cut:String}})"
    )


def measure_drift(clients: Clients, collection: str) -> Drift:
    """Count both sides now (see the module docstring)."""
    settings = clients.settings
    counted_before = datetime.now(UTC) - timedelta(seconds=settings.overlap_seconds)
    cut = ObjectId.from_datetime(counted_before)
    ch = clients.clickhouse
    in_clickhouse = clickhouse_call(
        settings,
        lambda: ch.command(
            clickhouse_count_sql(collection), parameters={"c": collection, "cut": str(cut)}
        ),
    )
    coll = clients.db[collection]
    # `$lt` an ObjectId selects ObjectIds only (BSON types compare within their type).
    in_mongo = mongo_call(settings, lambda: coll.count_documents({"_id": {"$lt": cut}}))
    return Drift(collection, int(in_mongo), int(in_clickhouse), counted_before, datetime.now(UTC))


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
        lambda: ch.insert(
            DRIFT_CHECKS.qualified, [row], column_names=[n for n, _ in DRIFT_CHECKS.columns]
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
