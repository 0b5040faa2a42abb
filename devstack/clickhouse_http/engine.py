"""The embedded engine: chdb opened on one data directory, and connections to it.

chdb lets one process open a data directory; inside that process, every `chdb.session.Session`
on the same path is a connection of its own to the same engine, with its own settings, current
database and temporary tables, and connections run statements in parallel. So a connection is
what a ClickHouse *session* is: the front gives one to every HTTP session (`session_id`) and a
fresh one to every request without a session, and closing it drops its temporary tables.

One statement runs at a time per connection (chdb refuses a second one while a result is being
streamed), which the session lock in `sessions.py` guarantees. Every method here blocks: call
it from a worker thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chdb import session as chdb_session

from devstack.clickhouse_http.errors import ClickHouseError
from devstack.clickhouse_http.statements import quote_identifier, quote_string

_STREAMING_UNSUPPORTED = "Streaming query is not supported"
_SETTING_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass
class Applied:
    """What one request changed on a connection for its own duration, to undo afterwards."""

    previous: dict[str, str | None] = field(default_factory=dict)  # None: was at its default
    database: str | None = None  # the database to return to, when the request changed it


class Connection:
    """One chdb connection: a ClickHouse session's settings, database and temporary tables."""

    def __init__(self, path: str) -> None:
        self._session = chdb_session.Session(path)
        # The session_timezone a SET statement gave this connection ("" = the server's).
        self.session_timezone = ""

    # --- statements ----------------------------------------------------------------------------
    def query(self, sql: str, fmt: str, params: dict[str, str] | None = None) -> Any:
        """Run a statement to completion; the result holds the whole output."""
        return self._session.query(sql, fmt, params=params or {})

    def stream(self, sql: str, fmt: str, params: dict[str, str] | None = None) -> Any | None:
        """Start a SELECT whose output is fetched block by block; None if it cannot stream.

        chdb streams only SELECT-like statements and refuses the others before running them.
        """
        try:
            return self._session.send_query(sql, fmt, params=params or {})
        except RuntimeError as exc:
            if _STREAMING_UNSUPPORTED in str(exc):
                return None
            raise

    def insert(self, statement: str, fmt: str) -> Any:
        """Start an INSERT whose data is appended in pieces (`append`, then `finish`)."""
        return self._session.send_insert(statement, fmt)

    def result_types(self, sql: str, params: dict[str, str]) -> list[str] | None:
        """The column types a SELECT returns (DESCRIBE, nothing runs); None if it cannot tell."""
        describe = f"DESCRIBE TABLE (\n{sql.rstrip().rstrip(';')}\n)"
        try:
            result = self._session.query(describe, "JSONCompactEachRow", params=params)
            lines = bytes(result.bytes()).splitlines()
            return [str(json.loads(line)[1]) for line in lines]
        except (RuntimeError, ValueError, IndexError):
            return None

    def rows(self, sql: str) -> list[list[str]]:
        text = bytes(self._session.query(sql, "TabSeparatedRaw").bytes()).decode()
        return [line.split("\t") for line in text.splitlines()]

    def run(self, sql: str) -> None:
        self._session.query(sql, "TabSeparated")

    # --- settings and database for one request -------------------------------------------------
    def changed_settings(self) -> dict[str, str]:
        return dict(self.rows("SELECT name, value FROM system.settings WHERE changed"))

    def current_database(self) -> str:
        return self.rows("SELECT currentDatabase()")[0][0]

    def apply(self, settings: dict[str, str], database: str | None, undo: bool = True) -> Applied:
        """Change settings and the current database for one request (URL parameters).

        With `undo`, remember the previous values so `restore` can put them back (a session's
        connection outlives the request; a connection of its own does not).
        """
        applied = Applied()
        if settings:
            for name in settings:
                if not set(name) <= _SETTING_NAME_CHARS:
                    raise ClickHouseError.of(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
            if undo:
                changed = self.changed_settings()
                applied.previous = {name: changed.get(name) for name in settings}
            assignments = ", ".join(f"{k} = {quote_string(v)}" for k, v in settings.items())
            self.run(f"SET {assignments}")
        if database:
            current = self.current_database()
            if current != database:
                try:
                    self.run(f"USE {quote_identifier(database)}")
                except BaseException:
                    self.restore(applied)
                    raise
                applied.database = current
        return applied

    def restore(
        self, applied: Applied, keep: Iterable[str] = (), keep_database: bool = False
    ) -> None:
        """Undo `apply`, except what the request's own SET (`keep`) or USE changed."""
        undo = {k: v for k, v in applied.previous.items() if k not in set(keep)}
        if undo:
            self.run(
                "SET "
                + ", ".join(
                    f"{name} = {quote_string(value) if value is not None else 'DEFAULT'}"
                    for name, value in sorted(undo.items())
                )
            )
        if applied.database is not None and not keep_database:
            self.run(f"USE {quote_identifier(applied.database)}")

    # --- external data --------------------------------------------------------------------------
    def create_external_table(self, name: str, columns: str, fmt: str, data: bytes) -> None:
        """A temporary table holding a file part of the request, for its query only."""
        table = quote_identifier(name)
        self.run(f"CREATE TEMPORARY TABLE {table} ({columns}) ENGINE = Memory")
        inserter = self.insert(f"INSERT INTO {table}", fmt)
        try:
            if data:
                inserter.append(data)
            inserter.finish()
        except BaseException:
            inserter.cancel()
            raise

    def drop_temporary_table(self, name: str) -> None:
        self.run(f"DROP TEMPORARY TABLE IF EXISTS {quote_identifier(name)}")

    def close(self) -> None:
        self._session.close()


class Engine:
    """chdb on one data directory; hands out connections and keeps one for itself.

    The engine's own connection stays open for the server's lifetime (so the engine is not torn
    down and restarted when the last client connection closes) and answers the front's own
    questions: time zone, version, and `KILL QUERY` for a query whose client went away.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._path = str(data_dir)
        self._own = Connection(self._path)
        self._own_lock = threading.Lock()  # the front's own statements, one at a time
        self.timezone, self.version = self._own.rows("SELECT timezone(), version()")[0]

    def connect(self) -> Connection:
        return Connection(self._path)

    def own_rows(self, sql: str) -> list[list[str]]:
        with self._own_lock:
            return self._own.rows(sql)

    def kill(self, marker: str) -> None:
        """Cancel the running statement whose text starts with `marker` (a comment the front
        put there: chdb picks its own query ids, so the text is what identifies a query)."""
        with self._own_lock:
            self._own.run(f"KILL QUERY WHERE startsWith(query, {quote_string(marker)}) ASYNC")

    def kill_all(self) -> None:
        """Cancel every running statement (at shutdown: requests end instead of holding it up)."""
        with self._own_lock:
            self._own.run("KILL QUERY WHERE NOT startsWith(query, 'KILL QUERY') ASYNC")

    def close(self) -> None:
        self._own.close()
