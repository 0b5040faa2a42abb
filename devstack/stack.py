"""The embedded stack: MongoDB, ClickHouse (HTTP front over chdb) and Redis, as one unit.

`Stack` knows nothing about environment variables: it starts exactly the servers it is asked
to. Deciding which parts are external (set by env vars) is the CLI's job (`devstack.settings`),
so tests can run a private stack whatever the environment says.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from devstack.clickhouse import ClickHouseServer
from devstack.mongo import MongoServer
from devstack.process import LOCALHOST, PortBusyError, StackError, free_ports
from devstack.redis_server import RedisServer
from devstack.service import Outcome, Service, ServiceStatus

# Start order; stop runs in reverse.
SERVICES: tuple[str, ...] = ("mongo", "clickhouse", "redis")
DEFAULT_PORTS = {"mongo": 27017, "clickhouse": 8123, "redis": 6379}


@dataclass
class Stack:
    data_dir: Path
    mongo_port: int = DEFAULT_PORTS["mongo"]
    clickhouse_port: int = DEFAULT_PORTS["clickhouse"]
    redis_port: int = DEFAULT_PORTS["redis"]
    clickhouse_password: str | None = None
    clickhouse_user: str = "default"
    _services: dict[str, Service] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).absolute()
        self._services = {
            "mongo": MongoServer(self.data_dir, self.mongo_port),
            "clickhouse": ClickHouseServer(
                self.data_dir, self.clickhouse_port, self.clickhouse_user, self.clickhouse_password
            ),
            "redis": RedisServer(self.data_dir, self.redis_port),
        }

    # --- connection details --------------------------------------------------------------------
    @property
    def mongo_uri(self) -> str:
        return self._services["mongo"].url

    @property
    def clickhouse_host(self) -> str:
        return LOCALHOST

    @property
    def clickhouse_url(self) -> str:
        return self._services["clickhouse"].url

    @property
    def redis_url(self) -> str:
        return self._services["redis"].url

    @property
    def env(self) -> dict[str, str]:
        """The contract env vars that point the pipeline at this stack."""
        return {
            "MONGO_URI": self.mongo_uri,
            "CLICKHOUSE_HOST": self.clickhouse_host,
            "CLICKHOUSE_PORT": str(self.clickhouse_port),
            "CLICKHOUSE_USER": self.clickhouse_user,
            "CLICKHOUSE_PASSWORD": self.clickhouse_password or "",
            "REDIS_URL": self.redis_url,
        }

    def service(self, name: str) -> Service:
        try:
            return self._services[name]
        except KeyError:
            raise StackError(
                f"unknown service {name!r}; the stack has {', '.join(SERVICES)}"
            ) from None

    # --- life cycle ----------------------------------------------------------------------------
    def up(self, services: Iterable[str] = SERVICES) -> list[Outcome]:
        """Start the given services (those already running are left alone).

        Every port is checked before anything starts, so a busy port fails fast and leaves
        nothing half-started. If a later service fails, the ones started by this call stop.
        """
        names = self._ordered(services)
        for name in names:
            self.service(name).command()  # MissingBinaryError first: the first thing to fix
        busy = []
        for name in names:
            try:
                self.service(name).ensure_port_free()
            except PortBusyError as exc:
                busy.append(exc)
        if busy:
            raise busy[0] if len(busy) == 1 else StackError("\n".join(str(e) for e in busy))
        outcomes: list[Outcome] = []
        try:
            for name in names:
                outcomes.append(self.service(name).start())
        except BaseException:
            for outcome in reversed(outcomes):
                if outcome.action == "started":
                    self.service(outcome.name).stop()
            raise
        return outcomes

    def down(self, services: Iterable[str] = SERVICES) -> list[Outcome]:
        """Stop the given services cleanly (in reverse start order); data stays on disk."""
        outcomes = []
        errors = []
        for name in reversed(self._ordered(services)):
            try:
                outcomes.append(self.service(name).stop())
            except Exception as exc:  # keep stopping the others
                errors.append(f"{name}: {exc}")
        if errors:
            raise StackError("could not stop cleanly: " + "; ".join(errors))
        return outcomes

    def start(self, service: str) -> Outcome:
        return self.service(service).start()

    def stop(self, service: str) -> Outcome:
        return self.service(service).stop()

    def kill(self, service: str) -> Outcome:
        """SIGKILL one server (no clean shutdown), for fault-injection tests."""
        return self.service(service).kill()

    def status(self) -> list[ServiceStatus]:
        return [self.service(name).status() for name in SERVICES]

    def _ordered(self, services: Iterable[str]) -> list[str]:
        wanted = set(services)
        for name in wanted:
            self.service(name)  # unknown names fail loudly
        return [name for name in SERVICES if name in wanted]


def start_on_free_ports(
    data_dir: Path, clickhouse_password: str | None = None, attempts: int = 3
) -> Stack:
    """Start a stack of its own on free ports (tests, benchmarks); new ports if another
    program grabs one between the choice and the start."""
    for attempt in range(1, attempts + 1):
        mongo_port, clickhouse_port, redis_port = free_ports(3)
        stack = Stack(
            data_dir,
            mongo_port,
            clickhouse_port,
            redis_port,
            clickhouse_password=clickhouse_password,
        )
        try:
            stack.up()
        except PortBusyError:
            if attempt == attempts:
                raise
            continue
        return stack
    raise ValueError(f"attempts must be at least 1, got {attempts}")
