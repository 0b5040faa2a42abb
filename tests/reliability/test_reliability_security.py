"""Scenario 7: security. Servers on 127.0.0.1 only; a configured ClickHouse password is required;
no credential in the repo, the logs or the run records after a run with a known password; SQL
never carries document values; identifiers from config are validated."""

from __future__ import annotations

import re
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from bson import ObjectId
from clickhouse_recorder import recording_proxy
from harness import REPO, Report, assert_all_ok
from pydantic import ValidationError
from world import World

from devstack.stack import Stack, start_on_free_ports
from loader.settings import Settings
from loader.sync import sync_collection

PASSWORD = "rel-" + secrets.token_hex(12)


def listening_addresses(pid: int) -> set[str]:
    proc = psutil.Process(pid)
    conns = proc.net_connections(kind="inet")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


def test_embedded_servers_listen_on_127_0_0_1_only(stack: Stack, report: Report) -> None:
    seen = {}
    for status in stack.status():
        assert status.running and status.pid is not None, status
        seen[status.name] = listening_addresses(status.pid)
    report.record_check(
        "7 servers listen on 127.0.0.1 only", all(a == {"127.0.0.1"} for a in seen.values())
    )
    assert seen == {"mongo": {"127.0.0.1"}, "clickhouse": {"127.0.0.1"}, "redis": {"127.0.0.1"}}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    private = start_on_free_ports(tmp_path_factory.mktemp("secured"), clickhouse_password=PASSWORD)
    try:
        yield private
    finally:
        private.down()


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url + "/?query=SELECT%201", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_with_a_password_configured_requests_without_it_are_refused(secured: Stack) -> None:
    url = secured.clickhouse_url
    assert http_status(url) != 200
    assert http_status(url, {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "wrong"}) != 200
    assert http_status(url, {"X-ClickHouse-User": "default", "X-ClickHouse-Key": PASSWORD}) == 200


def test_password_is_not_on_any_process_command_line(secured: Stack) -> None:
    """Any local user can read /proc/<pid>/cmdline (`ps`): secrets travel by env or file."""
    leaking = [
        p.info["cmdline"][:3]
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and any(PASSWORD in part for part in p.info["cmdline"])
    ]
    assert leaking == []


def test_no_credential_in_logs_or_run_records_after_a_run_with_a_known_password(
    secured: Stack, report: Report, tmp_path: Path
) -> None:
    world = World(secured, tmp_path / "data")
    try:
        world.reset()
        world.seed(2_000)
        loader = world.spawn("sync", "--batch-size", "500")
        out, err = loader.communicate(timeout=300)
        assert loader.returncode == 0, err
        rerun = world.rerun_and_compare(("tasks", "employee"))
        world.db.tasks.insert_one({"_id": ObjectId(), "file_id": None})  # a reject, recorded
        world.sync("tasks")
        comparisons = rerun + world.compare_raw(("tasks", "employee"))
        comparisons += world.build_and_compare_models(tmp_path / "dbt")
        assert_all_ok(comparisons)
        places: dict[str, str] = {"loader stdout": out, "loader stderr": err}
        for base in (secured.data_dir / "logs", tmp_path / "dbt" / "logs", tmp_path / "dbt"):
            for path in sorted(base.rglob("*")):
                if path.is_file() and path.stat().st_size < 50_000_000:
                    places[str(path)] = path.read_text(errors="replace")
        for table in ("ops.sync_runs", "ops.watermarks", "raw.rejects"):
            places[table] = world.ch.query(f"SELECT * FROM {table}").result_rows.__repr__()
        leaks = sorted(name for name, text in places.items() if PASSWORD in text)
        report.record_check("7 no credential in logs/run records", not leaks, len(places))
        assert len(places) > 5
        assert leaks == []
    finally:
        world.close()


# A credential committed by mistake: a quoted literal assigned to a password-like name, or a
# connection string with a password. Tests hold throwaway passwords and are not scanned.
CREDENTIAL = re.compile(
    r"(?:password|passwd|secret|api_key)[\w]*\s*[:=]\s*['\"]([^'\"\s{}$<>*]{4,})['\"]"
    r"|://[^/\s:@]+:([^@\s/]+)@",
    re.IGNORECASE,
)
# Placeholders in documentation, not credentials.
PLACEHOLDERS = {"pass", "password", "secret", "***"}


def test_no_credential_is_committed_in_the_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    hits = []
    for name in files:
        if name.startswith("tests/") or not (REPO / name).is_file():
            continue
        text = (REPO / name).read_text(errors="replace")
        for match in CREDENTIAL.finditer(text):
            value = match.group(1) or match.group(2)
            if value.lower() not in PLACEHOLDERS:
                hits.append(f"{name}: {match.group(0)}")
    assert hits == []


def test_sql_sent_by_the_loader_never_contains_document_values(
    world: World, report: Report
) -> None:
    marker = "VALUE-" + secrets.token_hex(6)
    now = datetime.now(UTC).replace(microsecond=0)
    good = {
        "file_id": f"F-{marker}",
        "stage": "intake",
        "employee_code": "E1",
        "employee_name": f'O\'Brien "{marker}"; DROP TABLE raw.tasks; --',
        "status": "assigned",
        "assigned_at": now,
        "updated_at": now,
    }
    world.db.tasks.insert_many(
        [{"_id": ObjectId(), **good}, {"_id": ObjectId(), **good, "status": None}]
    )
    with recording_proxy(world.stack.clickhouse_port) as recording:
        settings = Settings(**{**world.settings.model_dump(), "clickhouse_port": recording.port})
        result = sync_collection(settings, "tasks")
        world.db.tasks.delete_one({"status": "assigned"})
        from loader.reconcile import reconcile_collection

        reconcile_collection(settings, "tasks")
    assert result.rows_written == 1 and result.rejects == 1
    # The proxy saw the loader's traffic (its inserts carried the values as data) ...
    assert any("INSERT INTO raw.tasks" in s for s in recording.sql)
    assert any(marker.encode() in b for b in recording.bodies)
    # ... and no statement text carried a document value.
    carrying = [s[:200] for s in recording.sql if marker in s]
    report.record_check("7 SQL never contains document values", not carrying, len(recording.sql))
    assert carrying == []
    assert world.ch.command("SELECT count() FROM raw.tasks FINAL WHERE is_deleted = 1") == 1


def test_unknown_collection_is_refused_naming_the_known_ones(world: World) -> None:
    with pytest.raises(ValueError, match="unknown collection 'tasks; DROP TABLE x'.*tasks"):
        sync_collection(world.settings, "tasks; DROP TABLE x")


def test_invalid_mongo_db_is_refused_naming_mongo_db(world: World) -> None:
    with pytest.raises(ValidationError, match="MONGO_DB='bad/db name' is not a MongoDB"):
        Settings(**{**world.settings.model_dump(), "mongo_db": "bad/db name"})
