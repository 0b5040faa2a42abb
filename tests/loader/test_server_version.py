"""Which ClickHouse releases the loader supports, and what it switches off on the older ones.

An older server is faked where the version is read (`ServerVersion.parse`, the seam), not by
mocking ClickHouse. Against the embedded engine (26.9) the tests check what the loader really
sends: every setting and function it uses against the engine's own record of the release that
brought it (`system.settings_changes`, `system.functions.introduced_in`), and a whole sync with
the `compatibility` setting of each supported release. `compatibility` only restores older
setting *defaults*: it cannot take away a setting, a function, a syntax or a storage feature
(patch parts) that a real older server lacks, nor reproduce its bugs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_recorder import Recording, recording_proxy
from pymongo.database import Database

from loader.cluster import insert_settings
from loader.server_version import (
    OLDEST_SUPPORTED,
    SUPPORTED_RELEASES,
    ServerVersion,
    UnsupportedServer,
    check,
    read_version,
)
from loader.settings import Settings
from loader.sync import sync_collection
from synthetic import seed

Release = tuple[int, int]


def release(text: str) -> Release:
    v = ServerVersion.parse(text)
    return (v.major, v.minor)


def test_the_version_is_read_from_what_the_server_reports() -> None:
    assert release("25.8.2.29") == (25, 8)
    assert str(ServerVersion.parse("24.8.14.39")) == "24.8.14.39"
    with pytest.raises(ValueError, match="cannot read a ClickHouse version from 'dev'"):
        ServerVersion.parse("dev")


@pytest.mark.parametrize("reported", ["24.8.14.39", "25.3.6.56"])
def test_before_25_7_patch_part_deletes_are_off_with_one_notice(
    reported: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="loader.server_version"):
        version = check(ServerVersion.parse(reported))
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"ClickHouse {reported}: patch-part deletes")
    assert "needs 25.7, using classic lightweight deletes" in line
    assert version.delete_settings() == {}
    assert version.dbt_vars() == {"task_events_patch_deletes": False}


@pytest.mark.parametrize("reported", ["25.7.1.1", "25.8.2.29", "26.9.2.1"])
def test_from_25_7_nothing_is_off_and_nothing_is_said(
    reported: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="loader.server_version"):
        version = check(ServerVersion.parse(reported))
    assert caplog.records == []
    assert version.delete_settings() == {"lightweight_delete_mode": "lightweight_update"}
    assert version.dbt_vars() == {}


def test_a_server_older_than_the_oldest_supported_release_is_refused_with_the_fix() -> None:
    with pytest.raises(
        UnsupportedServer, match=r"ClickHouse 24\.3\.1 .* upgrade the server to 24\.8"
    ):
        check(ServerVersion.parse("24.3.1"))


def test_the_version_of_the_embedded_engine_is_read_and_nothing_is_off(
    clickhouse_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="loader.server_version"):
        version = read_version(clickhouse_client)
    assert (version.major, version.minor) >= (26, 9)
    assert caplog.records == []


# --- what the loader sends, against what each supported release has ---------------------------


@pytest.fixture
def recorded(settings: Settings, plain_db: Database, stack: Any) -> tuple[Recording, int]:
    """A sync of both collections (rejects included) through the recording proxy; the driver's
    own settings are learnt from a bare query first, so that only the loader's remain."""
    seed(plain_db, 300, seed=5, malformed_ratio=0.05)
    with recording_proxy(stack.clickhouse_port) as recording:
        bare = clickhouse_connect.get_client(host="127.0.0.1", port=recording.port)
        bare.command("SELECT 1")
        bare.close()
        bare_requests = len(recording.requests)
        proxied = Settings(**{**settings.model_dump(), "clickhouse_port": recording.port})
        for collection in ("tasks", "employee"):
            sync_collection(proxied, collection, batch_size=100)
    return recording, bare_requests


def introduced_settings(client: Client) -> dict[str, Release]:
    """Setting name -> the release that added it, from the engine's own change log."""
    first: dict[str, Release] = {}
    for version, name in client.query(
        "SELECT version, c.name FROM system.settings_changes ARRAY JOIN changes AS c "
        "WHERE c.reason ILIKE '%new setting%'"
    ).result_rows:
        first[name] = min(first.get(name, (99, 99)), release(version))
    return first


def test_every_setting_the_loader_sends_exists_in_every_supported_release(
    recorded: tuple[Recording, int], clickhouse_client: Client
) -> None:
    known = {
        name
        for (name,) in clickhouse_client.query(
            "SELECT name FROM system.settings UNION ALL SELECT name FROM system.merge_tree_settings"
        ).result_rows
    }
    # The driver adds settings of its own, only where the server has them: not the loader's.
    recording, bare = recorded
    driver = {name for request in recording.requests[:bare] for name in request.params}
    sent = {
        name
        for request in recording.requests[bare:]
        for name in request.params
        if name in known and name not in driver
    }
    sent |= set(insert_settings("any", "t", []))  # and in cluster mode (test_cluster_mode)
    gated = set(ServerVersion(99, 0).delete_settings())  # sent only where the server has them

    def sent_to(r: str) -> set[str]:
        return (sent - gated) | set(ServerVersion.parse(r).delete_settings())

    introduced = introduced_settings(clickhouse_client)
    too_new = {
        (name, r): introduced[name]
        for r in SUPPORTED_RELEASES
        for name in sent_to(r)
        if introduced.get(name, (0, 0)) > release(r)
    }
    assert sent and too_new == {}
    # The gated setting really is newer than the oldest release: the gate is needed.
    assert all(introduced[name] > OLDEST_SUPPORTED for name in gated)


def test_every_function_the_loader_calls_exists_in_the_oldest_supported_release(
    recorded: tuple[Recording, int], clickhouse_client: Client
) -> None:
    call = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(")
    called = {name for sql in recorded[0].sql for name in call.findall(sql)}
    rows = clickhouse_client.query(
        "SELECT name, introduced_in FROM system.functions WHERE name IN {n:Array(String)}",
        parameters={"n": sorted(called)},
    ).result_rows
    assert len(rows) >= 5  # the loader calls functions (count, greatest, fromUnixTimestamp64...)
    too_new = {name: since for name, since in rows if since and release(since) > OLDEST_SUPPORTED}
    assert too_new == {}


@pytest.mark.parametrize("compatibility", [r for r in SUPPORTED_RELEASES if r != "26.9"])
def test_a_sync_runs_with_the_setting_defaults_of_each_supported_release(
    compatibility: str, settings: Settings, plain_db: Database, stack: Any
) -> None:
    seed(plain_db, 200, seed=6, malformed_ratio=0.05)
    with recording_proxy(
        stack.clickhouse_port, add_params={"compatibility": compatibility}
    ) as recording:
        proxied = Settings(**{**settings.model_dump(), "clickhouse_port": recording.port})
        result = sync_collection(proxied, "tasks", batch_size=50)
    assert result.status == "ok"
    assert result.docs_read == 200 == result.rows_written + result.rejects
