"""`remembered_count` gives what the full FINAL count gives, from the last count when it can."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bson import ObjectId
from clickhouse_connect.driver.client import Client
from pymongo.database import Database

from loader.clients import Clients
from loader.drift import clickhouse_counts
from loader.raw_count import remembered_count
from loader.settings import Settings
from loader.sync import sync_collection
from synthetic import seed


class DictMemo:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get(self, collection: str) -> str | None:
        return self.values.get(collection)

    def set(self, collection: str, value: str) -> None:
        self.values[collection] = value


def load(settings: Settings, clients: Clients, db: Database, ch: Client, n: int) -> None:
    seed(db, n, seed=n)
    sync_collection(settings, "tasks", clients=clients)
    # One part: no background merge changes the table's parts while a test counts.
    ch.command("OPTIMIZE TABLE raw.tasks FINAL")


def full_count(ch: Client, cut: ObjectId) -> int:
    live, _ = clickhouse_counts(ch, "tasks", cut)
    return live


def test_a_later_cut_adds_the_ids_between_the_cuts(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    load(settings, clients, db, clickhouse_client, 500)
    memo = DictMemo()
    before = ObjectId.from_datetime(datetime(2000, 1, 1, tzinfo=UTC))  # before every id
    now = ObjectId.from_datetime(datetime.now(UTC) + timedelta(seconds=1))

    first = remembered_count(clickhouse_client, "tasks", before, memo)
    second = remembered_count(clickhouse_client, "tasks", now, memo)

    assert (first, second) == (0, 500)


def test_a_tombstone_written_since_the_last_count_is_counted(
    settings: Settings, clients: Clients, db: Database, clickhouse_client: Client
) -> None:
    load(settings, clients, db, clickhouse_client, 500)
    memo = DictMemo()
    cut = ObjectId.from_datetime(datetime.now(UTC) + timedelta(seconds=1))
    assert remembered_count(clickhouse_client, "tasks", cut, memo) == 500
    victim = clickhouse_client.command("SELECT min(_id) FROM raw.tasks")
    clickhouse_client.command(
        "INSERT INTO raw.tasks SELECT * REPLACE (_version + 1 AS _version, 1 AS is_deleted) "
        "FROM raw.tasks FINAL WHERE _id = {i:String}",
        parameters={"i": victim},
    )

    assert (
        remembered_count(clickhouse_client, "tasks", cut, memo)
        == full_count(clickhouse_client, cut)
        == 499
    )
