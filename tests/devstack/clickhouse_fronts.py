"""ClickHouse fronts for the devstack suite, started the way the stack starts them.

A front is `devstack.clickhouse.ClickHouseServer` (`python -m devstack.clickhouse_http` as a
detached process, ready once `/ping` answers), on a free port with its own temporary data dir.
The fixtures are in conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import clickhouse_connect
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
