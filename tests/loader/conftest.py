"""Loader fixtures: settings bound to the session stack and a clean slate for every test.

The `raw` and `ops` databases are shared by the whole session (their names are part of the
contract), so each loader test starts by emptying the loader's tables and its own Mongo database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from loader_testlib import Loaded
from pymongo import MongoClient
from pymongo.database import Database

import synthetic
from devstack.mongo import MARKER_COLLECTION, MARKER_DB, MARKER_ID
from loader.clients import Clients, open_clients_now
from loader.follower import follow_changes
from loader.mapping import CODEC_OPTIONS
from loader.schema import CHANGE_STREAM_STATE, COLLECTIONS, REJECTS, WATERMARKS, ensure_schema
from loader.settings import Settings
from loader.sync import SyncResult, sync_collection

LOADER_TEST_DB = "loader_test"


@pytest.fixture
def settings(stack: Any, clickhouse_client: Client, mongo_client: MongoClient) -> Settings:
    """Settings from the stack's env vars, a private Mongo database, quick retries."""
    mongo_client.drop_database(LOADER_TEST_DB)
    ensure_schema(clickhouse_client)
    for name in COLLECTIONS:
        clickhouse_client.command(f"TRUNCATE TABLE raw.{name}")
    clickhouse_client.command(f"TRUNCATE TABLE {REJECTS.qualified}")
    clickhouse_client.command(f"TRUNCATE TABLE {WATERMARKS.qualified}")
    clickhouse_client.command(f"TRUNCATE TABLE {CHANGE_STREAM_STATE.qualified}")
    return Settings(
        mongo_db=LOADER_TEST_DB,
        retry_attempts=2,
        retry_initial_wait=0.05,
        retry_max_wait=0.2,
        connect_timeout_seconds=1.0,
    )


@pytest.fixture
def clients(settings: Settings) -> Iterator[Clients]:
    opened = open_clients_now(settings)
    yield opened
    opened.close()


@pytest.fixture
def db(mongo_client: MongoClient, settings: Settings) -> Database:
    """The test's Mongo database, dates read as milliseconds (like the loader reads them)."""
    return mongo_client.get_database(settings.mongo_db, codec_options=CODEC_OPTIONS)


@pytest.fixture
def plain_db(mongo_client: MongoClient, settings: Settings) -> Database:
    """The test's Mongo database with the default codec: reads and writes real datetimes."""
    return mongo_client[settings.mongo_db]


@pytest.fixture
def foreign_server(stack: Any) -> Iterator[None]:
    """The test stack's MongoDB without the embedded stack's marker, as a real server has none;
    the marker is put back afterwards (the session stack is shared)."""
    # retryWrites=False: `local` is not replicated and refuses retryable writes.
    with MongoClient(stack.mongo_uri, retryWrites=False) as client:
        markers = client[MARKER_DB][MARKER_COLLECTION]
        saved = markers.find_one({"_id": MARKER_ID})
        assert saved is not None, "the test stack was started through devstack: it has the marker"
        markers.delete_one({"_id": MARKER_ID})
        try:
            yield
        finally:
            markers.replace_one({"_id": MARKER_ID}, saved, upsert=True)


@pytest.fixture
def loaded(settings: Settings, clients: Clients, db: Database) -> Loaded:
    """`loaded(n, seed=s)`: seed `tasks` with n synthetic documents and sync them, the start of
    most loader tests; the sync's result. `follow`: then store the change stream's position
    (an idle follower run), so the next follower run sees every later change. `into`: the
    database handle to seed through (default `db`)."""

    def load(
        tasks: int,
        *,
        seed: int,
        follow: bool = False,
        into: Database | None = None,
        malformed_ratio: float = 0.0,
    ) -> SyncResult:
        synthetic.seed(
            into if into is not None else db, tasks, seed=seed, malformed_ratio=malformed_ratio
        )
        result = sync_collection(settings, "tasks", clients=clients)
        if follow:
            follow_changes(settings, "tasks", clients=clients, idle_timeout_s=0.2)
        return result

    return load
