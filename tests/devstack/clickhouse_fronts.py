"""ClickHouse fronts for the devstack suite, started the way the stack starts them.

A front is `devstack.clickhouse.ClickHouseServer` (`python -m devstack.clickhouse_http` as a
detached process, ready once `/ping` answers), on a free port with its own temporary data dir.
The fixtures are in conftest.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import clickhouse_connect
import psutil
from clickhouse_connect.driver.client import Client

from devstack.clickhouse import ClickHouseServer
from devstack.process import LOCALHOST

HOST = LOCALHOST


@dataclass
class Front:
    """A running front: its address, process and log."""

    server: ClickHouseServer

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def pid(self) -> int:
        record = self.server.pidfile.read()
        assert record is not None, "the front is not running"
        return record.pid

    @property
    def log(self) -> str:
        return self.server.log_path.read_text(errors="replace")

    def client(self, **kwargs: object) -> Client:
        return clickhouse_connect.get_client(host=HOST, port=self.port, **kwargs)

    def stop(self) -> None:
        self.server.stop()


StartFront = Callable[..., Front]


@dataclass
class Growth:
    """How far a process's resident memory rose above where it stood when sampling began."""

    baseline: int
    peak: int

    @property
    def bytes(self) -> int:
        return self.peak - self.baseline


@contextmanager
def rss_growth(pid: int) -> Iterator[Growth]:
    """Sample the resident memory of `pid` every 10 ms while the block runs; the peak stays
    in the yielded `Growth` after it (a buffered body shows as growth, a streamed one not)."""
    server = psutil.Process(pid)
    growth = Growth(baseline=server.memory_info().rss, peak=0)
    growth.peak = growth.baseline
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            growth.peak = max(growth.peak, server.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield growth
    finally:
        done.set()
        sampler.join()
