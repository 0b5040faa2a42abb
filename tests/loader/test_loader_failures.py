"""Unreachable servers: retries, then an error naming the server and the variable to fix."""

from __future__ import annotations

import pytest
from clickhouse_connect.driver.client import Client
from pymongo.database import Database

from devstack.process import free_ports
from loader.changes import has_changes
from loader.clients import ServerUnavailable
from loader.settings import Settings
from loader.sync import sync_collection
from loader.watermark import Watermark, load_watermark
from synthetic import mutate, seed


@pytest.fixture
def closed_port() -> int:
    return free_ports(1)[0]


def _synced_then_changed(
    settings: Settings, db: Database, clickhouse_client: Client, seed_no: int
) -> Watermark | None:
    """Load a seeded collection, change it in Mongo; returns the watermark of that load."""
    seed(db, 200, seed=seed_no)
    sync_collection(settings, "tasks")
    before = load_watermark(clickhouse_client, "tasks")
    mutate(db, 10, seed=seed_no)
    return before


def _mongo_at(settings: Settings, port: int) -> Settings:
    return settings.model_copy(
        update={"mongo_uri": f"mongodb://127.0.0.1:{port}/?directConnection=true"}
    )


def test_unreachable_mongo_names_mongo_uri_and_keeps_the_watermark(
    settings: Settings, db: Database, clickhouse_client: Client, closed_port: int
) -> None:
    before = _synced_then_changed(settings, db, clickhouse_client, 301)
    broken = _mongo_at(settings, closed_port)

    with pytest.raises(ServerUnavailable) as err:
        sync_collection(broken, "tasks")

    assert "MONGO_URI" in str(err.value) and f"127.0.0.1:{closed_port}" in str(err.value)
    assert "after 2 attempt(s)" in str(err.value)
    assert load_watermark(clickhouse_client, "tasks") == before


def test_unreachable_clickhouse_names_clickhouse_vars_and_keeps_the_watermark(
    settings: Settings, db: Database, clickhouse_client: Client, closed_port: int
) -> None:
    before = _synced_then_changed(settings, db, clickhouse_client, 302)
    broken = settings.model_copy(update={"clickhouse_port": closed_port})

    with pytest.raises(ServerUnavailable) as err:
        sync_collection(broken, "tasks")

    assert "CLICKHOUSE_HOST / CLICKHOUSE_PORT" in str(err.value)
    assert f"127.0.0.1:{closed_port}" in str(err.value)
    assert load_watermark(clickhouse_client, "tasks") == before


def test_has_changes_with_unreachable_mongo_raises_the_same_clear_error(
    settings: Settings, closed_port: int
) -> None:
    broken = _mongo_at(settings, closed_port)

    with pytest.raises(ServerUnavailable, match="MONGO_URI"):
        has_changes(broken, "tasks")


def test_password_is_not_shown_in_the_error(settings: Settings, closed_port: int) -> None:
    broken = settings.model_copy(
        update={"mongo_uri": f"mongodb://loader:s3cret@127.0.0.1:{closed_port}/?authSource=admin"}
    )

    with pytest.raises(ServerUnavailable) as err:
        sync_collection(broken, "tasks")

    assert "s3cret" not in str(err.value) and "loader:***@" in str(err.value)
