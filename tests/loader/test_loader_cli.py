"""`python -m loader ...` against the env-configured servers, and the schema migrator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from clickhouse_connect.driver.client import Client
from pymongo import MongoClient

from devstack.process import free_ports
from loader.schema import ensure_schema
from loader.settings import Settings


def _loader(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loader", *args],
        env=os.environ | {"MONGO_DB": settings.mongo_db, "LOADER_RETRY_ATTEMPTS": "1"} | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("command", ["sync", "watch", "reconcile", "check", "seed"])
def test_every_command_has_help(settings: Settings, command: str) -> None:
    out = _loader(settings, command, "--help")

    assert out.returncode == 0 and "Usage" in out.stdout


def test_seed_then_sync_prints_a_summary_and_loads(
    settings: Settings, clickhouse_client: Client
) -> None:
    seeded = _loader(settings, "seed", "--tasks", "1500", "--seed", "3", "--malformed-ratio", "0")
    synced = _loader(settings, "sync", "--collection", "all")

    assert seeded.returncode == 0, seeded.stderr
    assert synced.returncode == 0, synced.stderr
    assert "tasks" in synced.stdout and "1,500" in synced.stdout
    assert clickhouse_client.command("SELECT count() FROM raw.tasks FINAL") == 1_500


def test_check_says_in_step_then_names_the_difference_with_exit_1(
    settings: Settings, mongo_client: MongoClient
) -> None:
    _loader(settings, "seed", "--tasks", "300")
    _loader(settings, "sync")
    in_step = _loader(settings, "check")
    tasks = mongo_client[settings.mongo_db].tasks
    gone = [d["_id"] for d in tasks.find({}, {"_id": 1}).limit(3)]
    tasks.delete_many({"_id": {"$in": gone}})

    apart = _loader(settings, "check")

    assert in_step.returncode == 0, in_step.stderr
    assert "in step" in in_step.stdout
    assert apart.returncode == 1, apart.stderr
    assert "3 differ" in apart.stdout and "python -m loader reconcile" in apart.stdout


def test_a_sync_of_a_replaced_collection_reloads_it_and_says_why(
    settings: Settings, clickhouse_client: Client
) -> None:
    _loader(settings, "seed", "--tasks", "1000", "--seed", "1")
    _loader(settings, "sync")
    # Re-seeded: fewer documents, all dated before the stored watermark.
    _loader(settings, "seed", "--tasks", "200", "--seed", "2")

    synced = _loader(settings, "sync", "--collection", "tasks")

    assert synced.returncode == 0, synced.stderr
    assert "was replaced" in synced.stdout + synced.stderr
    live = clickhouse_client.command("SELECT count() FROM raw.tasks FINAL WHERE is_deleted = 0")
    assert live == 200


def test_reconcile_prints_a_summary(settings: Settings) -> None:
    _loader(settings, "seed", "--tasks", "300")
    _loader(settings, "sync")

    out = _loader(settings, "reconcile", "--collection", "tasks")

    assert out.returncode == 0, out.stderr
    assert "reconcile" in out.stdout and "300" in out.stdout


def test_sync_with_unreachable_clickhouse_exits_with_a_clear_error(settings: Settings) -> None:
    out = _loader(settings, "sync", CLICKHOUSE_PORT=str(free_ports(1)[0]))

    assert out.returncode == 2
    assert "CLICKHOUSE_HOST / CLICKHOUSE_PORT" in out.stderr
    assert "Traceback" not in out.stderr


def test_schema_migration_adds_a_missing_column(
    settings: Settings, clickhouse_client: Client
) -> None:
    clickhouse_client.command("ALTER TABLE raw.employee DROP COLUMN team")

    changes = ensure_schema(clickhouse_client)

    assert changes == ["added column raw.employee.team LowCardinality(String)"]
    assert "team" in clickhouse_client.command(
        "SELECT groupArray(name) FROM system.columns WHERE database = 'raw' AND table = 'employee'"
    )


def test_settings_read_the_contract_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGO_URI", "mongodb://example:1/?replicaSet=rs0")
    monkeypatch.setenv("CLICKHOUSE_PORT", "9999")
    monkeypatch.setenv("LOADER_BATCH_SIZE", "123")

    s = Settings()

    assert (s.mongo_uri, s.clickhouse_port, s.batch_size) == (
        "mongodb://example:1/?replicaSet=rs0",
        9999,
        123,
    )


def _seeded(mongo_client: MongoClient, settings: Settings) -> int:
    return mongo_client[settings.mongo_db]["tasks"].count_documents({})


def test_seed_drops_and_reseeds_on_the_embedded_stack(
    settings: Settings, mongo_client: MongoClient
) -> None:
    first = _loader(settings, "seed", "--tasks", "200")
    again = _loader(settings, "seed", "--tasks", "150")

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert _seeded(mongo_client, settings) == 150  # dropped, then seeded


def test_seed_refuses_to_drop_on_a_server_the_stack_did_not_start(
    settings: Settings, mongo_client: MongoClient, foreign_server: None
) -> None:
    mongo_client[settings.mongo_db]["tasks"].insert_one({"precious": True})

    out = _loader(settings, "seed", "--tasks", "100")

    message = " ".join(out.stderr.split())  # rich wraps long lines when piped
    assert out.returncode == 2
    assert "refusing to drop" in message
    assert settings.mongo_uri.split("?")[0].removeprefix("mongodb://") in message  # which
    assert "did not start that server" in message  # why
    assert "--force" in message and "--keep" in message  # how to proceed
    assert "Traceback" not in message
    assert mongo_client[settings.mongo_db]["tasks"].find_one({"precious": True}) is not None


def test_seed_force_and_keep_proceed_on_a_server_the_stack_did_not_start(
    settings: Settings, mongo_client: MongoClient, foreign_server: None
) -> None:
    mongo_client[settings.mongo_db]["tasks"].insert_one({"precious": True})

    kept = _loader(settings, "seed", "--tasks", "100", "--keep")
    assert kept.returncode == 0, kept.stderr
    assert _seeded(mongo_client, settings) == 101  # nothing dropped, no force needed

    forced = _loader(settings, "seed", "--tasks", "100", "--force")
    assert forced.returncode == 0, forced.stderr
    assert _seeded(mongo_client, settings) == 100  # dropped


def test_cli_with_a_port_that_is_not_a_port_prints_one_line_naming_it(
    settings: Settings,
) -> None:
    out = _loader(settings, "sync", CLICKHOUSE_PORT="abc")

    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: invalid setting CLICKHOUSE_PORT: should be a port number from 1 to 65535, "
        "got 'abc' (fix or unset the variable)."
    ]


def test_watch_stopped_with_sigterm_ends_cleanly_and_records_why(
    settings: Settings, clickhouse_client: Client
) -> None:
    """A service manager (systemd, Docker, Kubernetes) stops a process with SIGTERM: watch
    stops as on Ctrl-C, with its position saved and its run recorded, and exits 0."""
    _loader(settings, "seed", "--tasks", "100", "--seed", "4")
    _loader(settings, "sync", "--collection", "tasks")
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loader", "watch", "--collection", "tasks", "--all-changes"],
        env=os.environ | {"MONGO_DB": settings.mongo_db, "LOADER_RETRY_ATTEMPTS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            saved = clickhouse_client.command(
                "SELECT toUnixTimestamp(max(saved_at)) FROM ops.change_stream_state "
                "WHERE collection = 'tasks'"
            )
            if int(saved or 0) >= int(started):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode == 0, err
    assert "stop requested" in out
    recorded = clickhouse_client.query(
        "SELECT status, message FROM ops.sync_runs WHERE kind = 'watch' "
        "ORDER BY started_at DESC LIMIT 1"
    ).result_rows
    assert recorded[0][0] == "ok" and "stop requested" in recorded[0][1]
