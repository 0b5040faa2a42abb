"""Fixtures of the devstack suite: ClickHouse fronts (clickhouse_fronts.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from clickhouse_fronts import Front, StartFront

from devstack.clickhouse import ClickHouseServer
from devstack.process import free_ports


@pytest.fixture(scope="module")
def start_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartFront]:
    """Start fronts (`start_front(data_dir=None, password=None, options=())`), stopped at the
    end of the module."""
    started: list[Front] = []

    def start(
        data_dir: Path | None = None, password: str | None = None, options: Sequence[str] = ()
    ) -> Front:
        base = data_dir or tmp_path_factory.mktemp("front")
        server = ClickHouseServer(base, free_ports(1)[0], password=password, options=options)
        server.start()
        front = Front(server)
        started.append(front)
        return front

    yield start
    for front in started:
        front.stop()


@pytest.fixture(scope="module")
def front(start_front: StartFront) -> Front:
    return start_front()


@pytest.fixture(scope="module")
def secured(start_front: StartFront) -> Front:
    return start_front(password="s3cret")
