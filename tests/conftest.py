"""Session fixtures: a private embedded stack on free ports, and clients bound to it.

The `stack` fixture exports the contract env vars (`MONGO_URI`, `MONGO_DB`, `CLICKHOUSE_*`,
`REDIS_URL`, and `PIPELINE_DATA_DIR` = its temp dir) into `os.environ` for the whole session, so
`Settings()` and every subprocess a test starts (dbt, the loader CLI, flows) talk to this stack
and never to the data of `make demo`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import clickhouse_connect
import pytest
import redis
from pymongo import MongoClient

from devstack.process import free_ports
from devstack.stack import Stack, start_on_free_ports

TEST_MONGO_DB = "pipeline_test"
CONTRACT_VARS = (
    "MONGO_URI",
    "MONGO_DB",
    "CLICKHOUSE_HOST",
    "CLICKHOUSE_PORT",
    "CLICKHOUSE_USER",
    "CLICKHOUSE_PASSWORD",
    "REDIS_URL",
    "PIPELINE_DATA_DIR",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Slow scenarios run only when asked for: RUN_SLOW=1, or an explicit `-m` expression.
    if os.environ.get("RUN_SLOW") == "1" or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow scenario: set RUN_SLOW=1 (or pass -m slow) to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("stack")
    saved = {name: os.environ.get(name) for name in CONTRACT_VARS}
    test_stack = start_on_free_ports(data_dir)
    os.environ.update(test_stack.env)
    os.environ["MONGO_DB"] = TEST_MONGO_DB
    # Anything that keeps files under the data dir (Prefect home, lock files) stays in the temp dir.
    os.environ["PIPELINE_DATA_DIR"] = str(data_dir)
    try:
        yield test_stack
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        test_stack.down()


@pytest.fixture(scope="session")
def mongo_client(stack: Stack) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(stack.mongo_uri, serverSelectionTimeoutMS=10_000)
    yield client
    client.close()


@pytest.fixture(scope="session")
def clickhouse_client(stack: Stack) -> Iterator[clickhouse_connect.driver.Client]:
    client = clickhouse_connect.get_client(
        host=stack.clickhouse_host,
        port=stack.clickhouse_port,
        username=stack.clickhouse_user,
        password=stack.clickhouse_password or "",
    )
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_client(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def secured_clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private ClickHouse front that requires a password (only ClickHouse is started):
    `.clickhouse_port`, `.clickhouse_password`. For tests of refused credentials."""
    secured = Stack(
        tmp_path_factory.mktemp("secured_clickhouse"),
        *free_ports(3),
        clickhouse_password="right-" + os.urandom(4).hex(),
    )
    secured.up(["clickhouse"])
    try:
        yield secured
    finally:
        secured.down(["clickhouse"])
