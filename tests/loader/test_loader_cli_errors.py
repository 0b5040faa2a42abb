"""Errors a person can act on, from `python -m loader ...` against real servers.

An unreachable server, refused credentials and a bad setting print one line on stderr naming
the variable to fix and exit 2, without a traceback unless --verbose. A failed sync is recorded
in ops.sync_runs and its line says whether the watermark moved. MongoDB refusing credentials is
produced by the real mongod: credentials for a user that does not exist are refused
(AuthenticationFailed) even where access control is off; ClickHouse refusing them by a private
front that requires a password.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from pymongo import MongoClient

from devstack.mongo import MongoServer
from devstack.process import free_ports
from devstack.stack import Stack
from loader.schema import ensure_schema
from loader.settings import Settings
from loader.watermark import load_watermark
from synthetic import seed

COMMANDS = {
    "sync": ["sync"],
    "reconcile": ["reconcile"],
    "watch": ["watch", "--idle-timeout", "1"],
    "seed": ["seed", "--tasks", "10"],
}


def _loader(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loader", *args],
        env=os.environ | {"MONGO_DB": settings.mongo_db} | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_line(out: subprocess.CompletedProcess[str], *names: str) -> str:
    """The one `error:` line of a failed command: exit 2, every name in it, no traceback."""
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def _failed_runs(client: Client, since: Any) -> dict[str, dict[str, Any]]:
    result = client.query(
        "SELECT * FROM ops.sync_runs WHERE status = 'failed' AND started_at >= {t:DateTime64(6)}",
        parameters={"t": since},
    )
    rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
    return {r["collection"]: r for r in rows}


def _now(client: Client) -> Any:
    return client.command("SELECT now64(6)")


@pytest.fixture
def closed_port() -> int:
    return free_ports(1)[0]


# --- MongoDB unreachable ----------------------------------------------------------------------


def test_unreachable_mongo_is_reported_within_10_s_and_recorded_as_a_failed_sync(
    settings: Settings, mongo_client: MongoClient, clickhouse_client: Client, closed_port: int
) -> None:
    seed(mongo_client[settings.mongo_db], 200, seed=41)
    assert _loader(settings, "sync").returncode == 0
    before = load_watermark(clickhouse_client, "tasks")
    since = _now(clickhouse_client)

    started = time.monotonic()
    # Default retry and timeout settings: the bound is the product's, not the test's.
    out = _loader(settings, "sync", MONGO_URI=f"mongodb://127.0.0.1:{closed_port}/?replicaSet=rs0")
    elapsed = time.monotonic() - started

    line = _error_line(out, "MONGO_URI", f"127.0.0.1:{closed_port}")
    assert "watermarks of tasks, employee did not move" in line
    assert elapsed < 12, f"reported after {elapsed:.1f} s"
    runs = _failed_runs(clickhouse_client, since)
    assert set(runs) == {"tasks", "employee"}
    assert runs["tasks"]["watermark_after"] == runs["tasks"]["watermark_before"]
    assert runs["tasks"]["watermark_after"] == before.describe()  # type: ignore[union-attr]
    assert "MONGO_URI" in runs["tasks"]["message"]
    assert "watermark of tasks did not move" in runs["tasks"]["message"]
    assert load_watermark(clickhouse_client, "tasks") == before


@pytest.mark.parametrize("command", ["reconcile", "watch", "seed"])
def test_unreachable_mongo_names_mongo_uri_in_every_command(
    settings: Settings, command: str, closed_port: int
) -> None:
    uri = f"mongodb://127.0.0.1:{closed_port}/?directConnection=true"

    out = _loader(settings, *COMMANDS[command], MONGO_URI=uri)

    _error_line(out, "MONGO_URI", f"127.0.0.1:{closed_port}")


@pytest.mark.parametrize("command", ["reconcile", "watch"])
def test_unreachable_mongo_is_recorded_as_a_failed_run_of_its_kind(
    settings: Settings, clickhouse_client: Client, command: str, closed_port: int
) -> None:
    ensure_schema(clickhouse_client)
    since = _now(clickhouse_client)

    _loader(settings, *COMMANDS[command], MONGO_URI=f"mongodb://127.0.0.1:{closed_port}/")

    runs = _failed_runs(clickhouse_client, since)
    assert set(runs) == {"tasks", "employee"}
    assert {r["kind"] for r in runs.values()} == {command}
    assert all("MONGO_URI" in r["message"] for r in runs.values())


# --- refused credentials ----------------------------------------------------------------------


def test_mongo_refusing_the_credentials_is_one_line_not_retried_and_recorded(
    settings: Settings, stack: Stack, clickhouse_client: Client
) -> None:
    uri = stack.mongo_uri.replace("mongodb://", "mongodb://nobody:not-the-password@")
    since = _now(clickhouse_client)

    out = _loader(settings, "sync", MONGO_URI=uri)

    line = _error_line(out, "MONGO_URI", "refused the credentials", "nobody:***@")
    assert "not-the-password" not in out.stderr
    runs = _failed_runs(clickhouse_client, since)
    assert set(runs) == {"tasks", "employee"}
    assert "refused the credentials" in runs["tasks"]["message"]
    assert "not-the-password" not in runs["tasks"]["message"]
    assert "did not move" in line


@pytest.mark.parametrize("command", ["reconcile", "watch", "seed"])
def test_mongo_refusing_the_credentials_in_every_command(
    settings: Settings, stack: Stack, command: str
) -> None:
    uri = stack.mongo_uri.replace("mongodb://", "mongodb://nobody:not-the-password@")

    out = _loader(settings, *COMMANDS[command], MONGO_URI=uri)

    _error_line(out, "MONGO_URI", "refused the credentials")


@pytest.mark.parametrize("command", ["sync", "reconcile", "watch"])
def test_clickhouse_refusing_the_password_names_user_and_password(
    settings: Settings, secured_clickhouse: Stack, command: str
) -> None:
    out = _loader(
        settings,
        *COMMANDS[command],
        CLICKHOUSE_PORT=str(secured_clickhouse.clickhouse_port),
        CLICKHOUSE_PASSWORD="wrong",
    )

    line = _error_line(out, "CLICKHOUSE_USER / CLICKHOUSE_PASSWORD", "refused")
    assert "AUTHENTICATION_FAILED" in line


# --- unreachable ClickHouse, bad settings, --verbose, --help ----------------------------------


@pytest.mark.parametrize("command", ["sync", "reconcile", "watch"])
def test_unreachable_clickhouse_names_host_and_port(
    settings: Settings, command: str, closed_port: int
) -> None:
    out = _loader(settings, *COMMANDS[command], CLICKHOUSE_PORT=str(closed_port))

    _error_line(out, "CLICKHOUSE_HOST / CLICKHOUSE_PORT", f"127.0.0.1:{closed_port}")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bad_setting_is_one_line_naming_the_variable(settings: Settings, command: str) -> None:
    out = _loader(settings, *COMMANDS[command], CLICKHOUSE_PORT="eighty")

    _error_line(out, "invalid setting CLICKHOUSE_PORT")


@pytest.mark.parametrize(
    ("command", "env", "variable"),
    [
        ("sync", {"LOADER_CONNECT_DEADLINE": "0"}, "LOADER_CONNECT_DEADLINE"),
        ("sync", {"MONGO_URI": "mongodb://loader:s3cret@127.0.0.1:port/"}, "MONGO_URI"),
        ("seed", {"MONGO_URI": "mongodb://loader:s3cret@127.0.0.1:port/"}, "MONGO_URI"),
    ],
)
def test_other_bad_settings(
    settings: Settings, command: str, env: dict[str, str], variable: str
) -> None:
    out = _loader(settings, *COMMANDS[command], **env)

    _error_line(out, f"invalid setting {variable}")
    assert "s3cret" not in out.stderr


def test_verbose_adds_the_traceback(settings: Settings, closed_port: int) -> None:
    out = _loader(settings, "reconcile", "--verbose", CLICKHOUSE_PORT=str(closed_port))

    assert out.returncode == 2
    assert "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_says_how_errors_are_reported(settings: Settings, command: str) -> None:
    out = _loader(settings, command, "--help")

    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "--verbose" in text and "traceback" in text


# --- MongoDB lost in the middle of a sync -----------------------------------------------------


@pytest.fixture
def private_mongo(tmp_path: Path) -> Iterator[MongoServer]:
    """A mongod of this test's own, to be killed half-way through a sync."""
    server = MongoServer(tmp_path, free_ports(1)[0])
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_mongo_lost_mid_sync_says_where_the_watermark_moved_to(
    settings: Settings, private_mongo: MongoServer, clickhouse_client: Client
) -> None:
    with MongoClient(private_mongo.url) as client:
        seed(client[settings.mongo_db], 3_000, seed=43)
    since = _now(clickhouse_client)
    # One document per batch, so the sync is still reading when the server is killed.
    proc = subprocess.Popen(
        [sys.executable, "-m", "loader", "sync", "--collection", "tasks", "--batch-size", "1"],
        env=os.environ
        | {"MONGO_DB": settings.mongo_db, "MONGO_URI": private_mongo.url}
        | {"LOADER_RETRY_ATTEMPTS": "2", "LOADER_RETRY_INITIAL_WAIT": "0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while load_watermark(clickhouse_client, "tasks") is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no batch was stored"
            time.sleep(0.05)
        private_mongo.kill()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    line = _error_line(out, "MONGO_URI")
    stored = load_watermark(clickhouse_client, "tasks")
    assert stored is not None
    assert f"the watermark of tasks moved to {stored.describe()} (from none)" in line
    assert "the next run resumes there" in line
    runs = _failed_runs(clickhouse_client, since)
    assert set(runs) == {"tasks"}
    assert runs["tasks"]["watermark_before"] == ""
    assert runs["tasks"]["watermark_after"] == stored.describe()
    assert f"moved to {stored.describe()}" in runs["tasks"]["message"]
    assert 0 < runs["tasks"]["rows_written"] < 3_000
