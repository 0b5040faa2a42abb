"""HTTP sessions (`session_id`), kept the way ClickHouse keeps them (src/Interpreters/Session.cpp).

- A request with `session_id` uses that session's engine connection: its settings (SET), current
  database (USE) and temporary tables. The first request creates the session.
- A session serves one request at a time: a second request while one runs is refused at once
  with SESSION_IS_LOCKED (373), it does not wait.
- A session closes `session_timeout` seconds (default 60, at most 3600) after its last request
  ended, and its temporary tables go with it; `session_check=1` refuses a session that does not
  exist (SESSION_NOT_FOUND, 372); `close_session=1` closes it after the request.
- A request without `session_id` gets a connection of its own, closed when it ends: what it
  sets or creates is gone afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from devstack.clickhouse_http.engine import Connection
from devstack.clickhouse_http.errors import (
    INVALID_SESSION_TIMEOUT,
    SESSION_IS_LOCKED,
    SESSION_NOT_FOUND,
    ClickHouseError,
)

log = logging.getLogger("devstack.clickhouse_http")

DEFAULT_SESSION_TIMEOUT_S = 60  # default_session_timeout
MAX_SESSION_TIMEOUT_S = 3600  # max_session_timeout


def parse_session_timeout(value: str | None) -> int:
    """`session_timeout` as ClickHouse reads it (HTTPHandler.cpp, parseSessionTimeout)."""
    if value is None:
        return DEFAULT_SESSION_TIMEOUT_S
    if not value.isascii() or not value.isdigit():
        raise ClickHouseError.of(
            INVALID_SESSION_TIMEOUT,
            "INVALID_SESSION_TIMEOUT",
            f"Invalid session timeout: '{value}'",
        )
    if int(value) > MAX_SESSION_TIMEOUT_S:
        raise ClickHouseError.of(
            INVALID_SESSION_TIMEOUT,
            "INVALID_SESSION_TIMEOUT",
            f"Session timeout '{value}' is larger than max_session_timeout: "
            f"{MAX_SESSION_TIMEOUT_S}. Maximum session timeout could be modified in "
            "configuration file",
        )
    return int(value)


@dataclass
class NamedSession:
    session_id: str
    connection: Connection
    timeout_s: int
    busy: bool = False
    expires_at: float = 0.0  # monotonic time; meaningful while not busy


@dataclass
class Lease:
    """One request's hold on a connection: of a named session, or a connection of its own."""

    connection: Connection
    session: NamedSession | None = None
    close_session: bool = False
    created: bool = field(default=False)

    @property
    def session_id(self) -> str | None:
        return self.session.session_id if self.session else None


class SessionRegistry:
    """The named sessions of the server. Thread-safe; connecting and closing may block."""

    def __init__(
        self, connect: Callable[[], Connection], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._connect = connect
        self._clock = clock
        self._sessions: dict[str, NamedSession] = {}
        self._lock = threading.Lock()

    def acquire(
        self,
        session_id: str | None,
        timeout_s: int = DEFAULT_SESSION_TIMEOUT_S,
        check: bool = False,
        close: bool = False,
    ) -> Lease:
        if not session_id:
            return Lease(self._connect())
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                if session.busy:
                    raise ClickHouseError.of(
                        SESSION_IS_LOCKED,
                        "SESSION_IS_LOCKED",
                        f"Session {session_id} is locked by a concurrent client",
                    )
                session.busy = True
                return Lease(session.connection, session, close)
            if check:
                raise ClickHouseError.of(
                    SESSION_NOT_FOUND, "SESSION_NOT_FOUND", f"Session {session_id} not found"
                )
            # Reserve the id before connecting (outside the lock): a concurrent request for the
            # same new session is then refused as locked, like ClickHouse does.
            session = NamedSession(session_id, _PENDING, timeout_s, busy=True)
            self._sessions[session_id] = session
        try:
            session.connection = self._connect()
        except BaseException:
            with self._lock:
                self._sessions.pop(session_id, None)
            raise
        log.info("session %s opened (timeout %d s)", session_id, timeout_s)
        return Lease(session.connection, session, close, created=True)

    def release(self, lease: Lease) -> None:
        """End a request: a session's timeout starts now; a connection of its own closes."""
        session = lease.session
        if session is None:
            lease.connection.close()
            return
        with self._lock:
            session.busy = False
            session.expires_at = self._clock() + session.timeout_s
            if lease.close_session:
                self._sessions.pop(session.session_id, None)
        if lease.close_session:
            session.connection.close()
            log.info("session %s closed (close_session)", session.session_id)

    def expire(self) -> int:
        """Close every idle session whose timeout has passed; returns how many were closed."""
        now = self._clock()
        with self._lock:
            expired = [s for s in self._sessions.values() if not s.busy and s.expires_at <= now]
            for session in expired:
                del self._sessions[session.session_id]
        for session in expired:
            session.connection.close()  # drops the session's temporary tables
            log.info("session %s expired after %d s idle", session.session_id, session.timeout_s)
        return len(expired)

    def snapshot(self) -> list[dict[str, object]]:
        now = self._clock()
        with self._lock:
            return [
                {
                    "session_id": s.session_id,
                    "busy": s.busy,
                    "timeout_s": s.timeout_s,
                    "expires_in_s": None if s.busy else round(max(0.0, s.expires_at - now), 3),
                }
                for s in self._sessions.values()
            ]

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            if session.connection is not _PENDING:
                session.connection.close()


class _Pending(Connection):
    """Placeholder while a new session's connection is being opened."""

    def __init__(self) -> None:  # no engine connection behind it
        pass

    def close(self) -> None:
        pass


_PENDING = _Pending()
