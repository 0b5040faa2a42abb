"""Server connections with retries, and the errors raised when a server stays unreachable.

The one client factory of the project: `connect_clickhouse`, `connect_mongo` and `connect_redis`
build every client of every package (loader, flows, web, bench) from
`loader.settings.ConnectionSettings`, so each server is reached with one configuration.
One `Clients` per process run: a pooled `clickhouse-connect` client and a `MongoClient`, created
once and passed to every operation (the first version opened a connection per operation).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import clickhouse_connect
import pymongo
import redis
import redis.asyncio as aioredis
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, CursorNotFound
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    stop_never,
)
from tenacity.stop import stop_base
from urllib3.util import Timeout

from loader.cluster import insert_settings
from loader.errors import short_reason
from loader.mapping import CODEC_OPTIONS
from loader.server_version import ServerVersion, read_version
from loader.settings import ConnectionSettings, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors worth retrying: the server may come back. `ConnectionFailure` covers AutoReconnect,
# NetworkTimeout and ServerSelectionTimeoutError; clickhouse-connect raises OperationalError for
# refused/reset connections and timeouts. SQL errors are not retried. `CursorNotFound`: a
# mongod restart or failover drops open cursors; the read reopens at the last stored batch.
MONGO_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionFailure, CursorNotFound)
CLICKHOUSE_TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, ConnectionError)


class ServerUnavailable(RuntimeError):
    """A server did not answer after every retry. The message says which and what to fix.

    It cannot know what the run stored before the failure: `sync_collection` adds a note saying
    whether the watermark moved (see `loader.errors.watermark_outcome`)."""

    def __init__(
        self,
        server: str,
        address: str,
        env_vars: str,
        attempts: int,
        cause: BaseException,
        elapsed_s: float | None = None,
    ):
        self.server = server
        self.address = address
        self.env_vars = env_vars
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.reason = short_reason(cause)
        within = f" in {elapsed_s:.1f} s" if elapsed_s is not None else ""
        super().__init__(
            f"{server} at {address} is unreachable after {attempts} attempt(s){within} "
            f"({type(cause).__name__}: {str(cause)[:300]}). Check {env_vars} and that the server "
            f"is running (`make up` starts the embedded stack)."
        )


def _unavailable(
    server: str, env_vars: str, address: Callable[[ConnectionSettings], str]
) -> Callable[..., ServerUnavailable]:
    def unavailable(
        settings: ConnectionSettings,
        attempts: int,
        cause: BaseException,
        elapsed_s: float | None = None,
    ) -> ServerUnavailable:
        return ServerUnavailable(server, address(settings), env_vars, attempts, cause, elapsed_s)

    return unavailable


# `(settings, attempts, cause, elapsed_s=None) -> ServerUnavailable` naming what to fix.
mongo_unavailable = _unavailable("MongoDB", "MONGO_URI", ConnectionSettings.redacted_mongo_uri)
clickhouse_unavailable = _unavailable(
    "ClickHouse", "CLICKHOUSE_HOST / CLICKHOUSE_PORT", ConnectionSettings.clickhouse_address
)


class _Streak:
    """Failed attempts in a row. With `progress` (a value that changes when the operation got
    further, such as the number of batches a read has stored), an attempt that made progress
    starts a new streak: a long read resumed at its last stored batch is not given up on for
    failures spread over hours, only for `retry_attempts` failures without progress."""

    def __init__(self, progress: Callable[[], object] | None) -> None:
        self.progress = progress
        self.seen = progress() if progress is not None else None
        self.before = 0  # attempts made before the current streak

    def failures(self, state: RetryCallState) -> int:
        if self.progress is not None:
            now = self.progress()
            if now != self.seen:
                self.seen = now
                self.before = state.attempt_number - 1
        return state.attempt_number - self.before


def retrying(
    settings: ConnectionSettings,
    transient: tuple[type[BaseException], ...],
    *,
    progress: Callable[[], object] | None = None,
    deadline_s: float | None = None,
    note: str = "transient error",
    level: int = logging.WARNING,
) -> Retrying:
    """The one retry policy: transient errors retried with exponential backoff
    (LOADER_RETRY_INITIAL_WAIT doubling up to LOADER_RETRY_MAX_WAIT), given up after
    LOADER_RETRY_ATTEMPTS failures in a row (see `_Streak` for `progress`) or, with
    `deadline_s`, before an attempt that would start after that many seconds."""
    streak = _Streak(progress)
    stop: stop_base = stop_before_delay(deadline_s) if deadline_s is not None else stop_never

    def give_up(state: RetryCallState) -> bool:
        return streak.failures(state) >= settings.retry_attempts or stop(state)

    def wait(state: RetryCallState) -> float:
        step = settings.retry_initial_wait * 2 ** (streak.failures(state) - 1)
        return max(settings.retry_initial_wait, min(settings.retry_max_wait, step))

    return Retrying(
        stop=give_up,
        wait=wait,
        retry=retry_if_exception_type(transient),
        before_sleep=lambda rs: log.log(
            level,
            "%s (attempt %d): %s; retrying",
            note,
            rs.attempt_number,
            rs.outcome and rs.outcome.exception(),
        ),
        reraise=False,
    )


def _call(
    settings: Settings,
    fn: Callable[[], T],
    transient: tuple[type[BaseException], ...],
    unavailable: Callable[[Settings, int, BaseException], ServerUnavailable],
    progress: Callable[[], object] | None = None,
) -> T:
    try:
        return retrying(settings, transient, progress=progress)(fn)
    except RetryError as err:
        cause = err.last_attempt.exception() or err
        raise unavailable(settings, err.last_attempt.attempt_number, cause) from cause


def connect_call(
    settings: ConnectionSettings,
    attempt: Callable[[float], T],
    transient: tuple[type[BaseException], ...],
    unavailable: Callable[..., ServerUnavailable],
) -> T:
    """The first connection to a server: `attempt(timeout_s)`, retried on transient errors
    until LOADER_CONNECT_DEADLINE seconds have passed in all (or LOADER_RETRY_ATTEMPTS
    attempts), each attempt given at most LOADER_CONNECT_TIMEOUT and never more than what is
    left. So a server that is down is reported within the deadline, not after attempts x
    timeout. Refused credentials and bad settings are not transient: they fail at once."""
    started = time.monotonic()
    deadline = started + settings.connect_deadline_seconds

    def once() -> T:
        left = deadline - time.monotonic()
        return attempt(max(0.1, min(settings.connect_timeout_seconds, left)))

    retry = retrying(
        settings,
        transient,
        deadline_s=settings.connect_deadline_seconds,
        note="connecting",
        level=logging.INFO,
    )
    try:
        return retry(once)
    except RetryError as err:
        cause = err.last_attempt.exception() or err
        elapsed = time.monotonic() - started
        raise unavailable(settings, err.last_attempt.attempt_number, cause, elapsed) from cause


def mongo_call(
    settings: Settings, fn: Callable[[], T], *, progress: Callable[[], object] | None = None
) -> T:
    """Run `fn` (a Mongo operation), retrying transient errors with backoff. `progress`: for
    an `fn` that resumes where the last attempt got to (see `retrying`)."""
    return _call(settings, fn, MONGO_TRANSIENT, mongo_unavailable, progress)


def clickhouse_call(settings: Settings, fn: Callable[[], T]) -> T:
    """Run `fn` (a ClickHouse operation), retrying transient errors with backoff."""
    return _call(settings, fn, CLICKHOUSE_TRANSIENT, clickhouse_unavailable)


@dataclass
class Clients:
    """The two connections of one process run. Close with `close()` or use `open_clients`."""

    settings: Settings
    mongo: MongoClient
    clickhouse: Client
    schema_ready: set[str] = field(default_factory=set)  # what is migrated or built already
    server_version: ServerVersion | None = None  # read once, by `version()`

    @property
    def db(self) -> Database:
        return self.mongo.get_database(self.settings.mongo_db, codec_options=CODEC_OPTIONS)

    def version(self) -> ServerVersion:
        """The ClickHouse server's version, read (and checked, with its one notice line) on
        first use: what it lacks is switched off, never found missing mid-run."""
        if self.server_version is None:
            self.server_version = clickhouse_call(
                self.settings, lambda: read_version(self.clickhouse)
            )
        return self.server_version

    def with_own_clickhouse(self) -> Clients:
        """The same MongoDB client, settings and known server version over a ClickHouse
        connection of its own (a thread that queries beside this one); close only its
        `clickhouse`."""
        return Clients(
            self.settings,
            self.mongo,
            connect_clickhouse(self.settings),
            server_version=self.server_version,
        )

    def close(self) -> None:
        self.mongo.close()
        self.clickhouse.close()


def connect_clickhouse(settings: ConnectionSettings) -> Client:
    """The ClickHouse client of every package: pooled HTTP, no session (sessions serialise
    queries on the server; pages and runs query concurrently), the connect deadline of
    `connect_call`, and LOADER_CONNECT_TIMEOUT / 300 s for later connections and reads."""
    timeout = settings.connect_timeout_seconds
    read_timeout = max(300.0, timeout)

    def attempt(left: float) -> Client:
        client = clickhouse_connect.get_client(
            host=settings.clickhouse_host,
            port=settings.clickhouse_port,
            username=settings.clickhouse_user,
            password=settings.clickhouse_password.get_secret_value(),
            # Whole seconds (clickhouse-connect rounds down): this attempt's share of the
            # deadline, at least 1 s.
            connect_timeout=max(1, int(left)),
            send_receive_timeout=read_timeout,
            # Sessions serialise queries on the server; the loader does not need them.
            autogenerate_session_id=False,
        )
        # Later connections of the pool wait the configured time, not this attempt's share.
        client.timeout = Timeout(connect=timeout, read=read_timeout)  # type: ignore[attr-defined]  # HttpClient's
        return client

    return connect_call(settings, attempt, CLICKHOUSE_TRANSIENT, clickhouse_unavailable)


def connect_mongo(settings: ConnectionSettings) -> MongoClient:
    """The MongoDB client of every package, pinged within the connect deadline."""
    timeout_ms = int(settings.connect_timeout_seconds * 1000)
    client: MongoClient = MongoClient(
        settings.mongo_uri,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        appname="mongo-clickhouse-loader",
    )

    def ping(timeout: float) -> None:
        with pymongo.timeout(timeout):  # bounds server selection too
            client.admin.command("ping")

    try:
        connect_call(settings, ping, MONGO_TRANSIENT, mongo_unavailable)
    except BaseException:
        client.close()
        raise
    return client


def connect_redis(settings: ConnectionSettings, *, blocking_reads: bool = False) -> redis.Redis:
    """The Redis client of every package (text replies). Connecting, and every reply unless
    `blocking_reads` (a stream read that waits for a signal), is bounded by
    PIPELINE_REDIS_TIMEOUT_SECONDS: Redis is optional and its callers go on without it."""
    timeout = settings.redis_timeout_seconds
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=None if blocking_reads else timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
    )


def connect_redis_async(settings: ConnectionSettings) -> aioredis.Redis:
    """`connect_redis` for an event loop (the web dashboard's live listener, which waits on a
    channel, so only connecting is bounded)."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout_seconds,
        decode_responses=True,
    )


def open_clients_now(settings: Settings) -> Clients:
    """Connect to both servers (ClickHouse first: it holds the run records)."""
    ch = connect_clickhouse(settings)
    try:
        mongo = connect_mongo(settings)
    except BaseException:
        ch.close()
        raise
    return Clients(settings, mongo, ch)


@contextmanager
def open_clients(settings: Settings, clients: Clients | None = None) -> Iterator[Clients]:
    """Yield `clients` if given (the caller owns them), else new ones closed on exit."""
    if clients is not None:
        yield clients
        return
    own = open_clients_now(settings)
    try:
        yield own
    finally:
        own.close()


def insert_json_rows(
    client: Client,
    table: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    cluster: str | None = None,
) -> int:
    """Insert a few bookkeeping rows (str, int, finite float, datetime) as JSONEachRow.

    `Client.insert` imports pandas on first use (to test whether the data is a DataFrame),
    a third of a second that a short command (a flow run with nothing to do) should not pay.
    Datetimes are sent as UTC text (naive ones are taken as UTC); ClickHouse truncates the
    fraction to the column's precision. Returns the rows inserted. `cluster`: see
    `loader.cluster.insert_settings` (None: `CLICKHOUSE_CLUSTER` from the environment)."""
    lines = []
    for row in rows:
        values = {}
        for name, value in zip(columns, row, strict=True):
            if isinstance(value, datetime):
                if value.tzinfo is not None:
                    value = value.astimezone(UTC)
                value = value.strftime("%Y-%m-%d %H:%M:%S.%f")
            elif isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{table}.{name}: {value} cannot be sent as JSON")
            values[name] = value
        lines.append(json.dumps(values))
    if lines:
        body = "\n".join(lines).encode()
        client.raw_insert(
            table,
            list(columns),
            insert_block=body,
            settings=insert_settings(cluster, table, [body]),
            fmt="JSONEachRow",
        )
    return len(lines)
