"""A MongoDB replica set of several members on one machine (`rs0`), for failover tests and trials.

Each member is a mongod of its own (its own port, data dir, log and pid file), started, stopped
and killed like every embedded server (`Service`); the set initiates them as one and tells which
member is primary. `make up` keeps its single-member set (`devstack.mongo.MongoServer`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

from pymongo.errors import ConnectionFailure, PyMongoError

from devstack.mongo import REPLICA_SET, MongoServer, ensure_replica_set
from devstack.process import NotReadyError, PortBusyError, StackError
from devstack.service import Outcome, ServiceStatus

# MongoDB's default: a secondary calls an election after this long without hearing from the
# primary. Tests pass a shorter one so that a failover fits in a few seconds.
DEFAULT_ELECTION_TIMEOUT_MS = 10_000
# How long a member asked to shut down lets its readers move away (MongoDB's default: 15 s).
QUIESCE_SECONDS = 1


class ReplicaMember(MongoServer):
    """Member `index` of a `MongoReplicaSet`. The set initiates itself once every member
    answers, so a member's own start only waits for it to answer and writes the marker (into
    `local`, which a member that is not primary accepts too)."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        index: int,
        mongod: Path | None = None,
        test_commands: bool = False,
    ) -> None:
        self.index = index
        self.name = f"mongo-{index}"  # before Service.__init__: it names the pid file
        self.test_commands = test_commands
        super().__init__(data_dir, port, mongod)

    def command(self) -> list[str]:
        if not self.test_commands:
            return super().command()
        # Fail points (e.g. stop a secondary's replication), for fault-injection tests only.
        return [*super().command(), "--setParameter", "enableTestCommands=1"]

    @property
    def address(self) -> str:
        """host:port, as the replica set config and the `hello` replies name this member."""
        return f"{self.host}:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / f"mongo-{self.index}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / f"mongod-{self.index}.log"

    def after_start(self) -> None:
        pidrec = self.pidfile.read()
        if pidrec is None:
            raise NotReadyError(f"{self.name} pid file vanished during start-up")
        self.write_marker(pidrec.pid, self.port)

    def request_shutdown(self, port: int) -> None:
        # A member otherwise waits out a quiesce period (15 s) for its readers to move to other
        # members, and a primary for a secondary to catch up: the embedded set's readers are
        # tests and trials, whose clients follow the set anyway.
        with (
            self.direct_client(port, timeout_ms=5000) as client,
            contextlib.suppress(ConnectionFailure),
        ):
            client.admin.command("shutdown", force=True, timeoutSecs=QUIESCE_SECONDS)

    def is_primary(self) -> bool:
        """True when this member answers and is the writable primary right now."""
        try:
            with self.direct_client(timeout_ms=1000) as client:
                return bool(client.admin.command("hello").get("isWritablePrimary"))
        except PyMongoError:
            return False


class MongoReplicaSet:
    """`len(ports)` members of `rs0`, member i on `ports[i]`, all under `data_dir`.

    `test_commands` starts the members with MongoDB's test commands (fail points): for tests
    that must stop replication on purpose, never for a set that holds real data."""

    def __init__(
        self,
        data_dir: Path,
        ports: Sequence[int],
        *,
        election_timeout_ms: int = DEFAULT_ELECTION_TIMEOUT_MS,
        mongod: Path | None = None,
        start_timeout: float = 120.0,
        test_commands: bool = False,
    ) -> None:
        if len(ports) < 1 or len(set(ports)) != len(ports):
            raise ValueError(f"a replica set needs distinct ports, one per member; got {ports}")
        self.data_dir = Path(data_dir).absolute()
        self.election_timeout_ms = election_timeout_ms
        self.start_timeout = start_timeout
        self.members = [
            ReplicaMember(self.data_dir, port, i, mongod, test_commands)
            for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        """Every member as a seed: a client connects whichever of them is down at the time."""
        hosts = ",".join(m.address for m in self.members)
        return f"mongodb://{hosts}/?replicaSet={REPLICA_SET}"

    def member(self, index: int) -> ReplicaMember:
        return self.members[index]

    # --- life cycle ----------------------------------------------------------------------------
    def up(self) -> list[Outcome]:
        """Start every member (those running are left alone), initiate the set with all of
        them (or point an existing set at these ports), and wait for a primary. Ports are
        checked before anything starts; if a member fails, those started by this call stop."""
        for m in self.members:
            m.command()  # MissingBinaryError first: the first thing to fix
        busy = []
        for m in self.members:
            try:
                m.ensure_port_free()
            except PortBusyError as exc:
                busy.append(str(exc))
        if busy:
            raise StackError("\n".join(busy))
        outcomes: list[Outcome] = []
        try:
            for m in self.members:
                outcomes.append(m.start())
            with self.members[0].direct_client(timeout_ms=10_000) as client:
                ensure_replica_set(
                    client,
                    [m.address for m in self.members],
                    {"electionTimeoutMillis": self.election_timeout_ms},
                )
            self.wait_until_settled()
        except BaseException:
            for outcome in reversed(outcomes):
                if outcome.action == "started":
                    self._member_named(outcome.name).stop()
            raise
        return outcomes

    def down(self) -> list[Outcome]:
        """Stop every member cleanly, the primary last (a primary asked to shut down first
        waits for a secondary to catch up and hands over; with none left it is forced)."""
        primary = self.primary()
        order = [m for m in reversed(self.members) if m is not primary]
        outcomes = []
        errors = []
        for m in [*order, *([primary] if primary else [])]:
            try:
                outcomes.append(m.stop())
            except Exception as exc:  # keep stopping the others
                errors.append(f"{m.name}: {exc}")
        if errors:
            raise StackError("could not stop the replica set cleanly: " + "; ".join(errors))
        return outcomes

    def status(self) -> list[ServiceStatus]:
        return [m.status() for m in self.members]

    # --- who is primary ------------------------------------------------------------------------
    def primary(self) -> ReplicaMember | None:
        """The member that is the writable primary right now, or None (an election is on)."""
        return next((m for m in self.members if m.is_primary()), None)

    def wait_for_primary(
        self, timeout: float | None = None, other_than: ReplicaMember | None = None
    ) -> ReplicaMember:
        """Wait until a member (not `other_than`: the primary that was just lost) is primary."""
        limit = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            candidates = [m for m in self.members if m is not other_than]
            primary = next((m for m in candidates if m.is_primary()), None)
            if primary is not None:
                return primary
            if time.monotonic() > deadline:
                logs = ", ".join(str(m.log_path) for m in self.members)
                raise StackError(
                    f"replica set {REPLICA_SET} elected no primary within {limit:.0f}s "
                    f"(members {', '.join(m.address for m in candidates)}). A set needs a "
                    f"majority of its {len(self.members)} members up to elect one: start the "
                    f"members that are down. See the logs: {logs}"
                )
            time.sleep(0.1)

    def states(self) -> dict[str, str]:
        """address -> state (`PRIMARY`, `SECONDARY`, `RECOVERING`, ...), as the set sees it
        from whichever member answers first; {} when none does."""
        for m in self.members:
            try:
                with m.direct_client(timeout_ms=1000) as client:
                    status = client.admin.command("replSetGetStatus")
            except PyMongoError:
                continue
            return {x["name"]: x["stateStr"] for x in status["members"]}
        return {}

    def wait_until_settled(self, timeout: float | None = None) -> ReplicaMember:
        """Wait until one member is primary and every other one a secondary (right after an
        initiate, or after a member came back); return the primary. An election that follows
        right after the first one (a member that turns out more up to date takes over) is
        over by then, so a test that kills "the primary" kills the one that stays."""
        limit = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            states = self.states()
            primary = self.primary()
            settled = sorted(states.values()) == [
                "PRIMARY",
                *["SECONDARY"] * (len(self.members) - 1),
            ]
            if primary is not None and settled and states.get(primary.address) == "PRIMARY":
                return primary
            if time.monotonic() > deadline:
                raise StackError(
                    f"replica set {REPLICA_SET} did not settle into one primary and "
                    f"{len(self.members) - 1} secondaries within {limit:.0f}s: "
                    f"{states or 'no member answers'}. "
                    "Start the members that are down; see their logs under "
                    f"{self.data_dir / 'logs'}"
                )
            time.sleep(0.2)

    def _member_named(self, name: str) -> ReplicaMember:
        return next(m for m in self.members if m.name == name)
