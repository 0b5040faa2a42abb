"""How many statements run in the engine at once, and what waits.

Connections run in parallel, but the machine has few cores: at most `limit` requests execute at
a time and the rest wait their turn in arrival order, up to `max_wait_s` (ClickHouse's
`max_concurrent_queries` / `queue_max_wait_ms`; past the wait, TOO_MANY_SIMULTANEOUS_QUERIES).
Every wait is logged with its length, and `status()` says what runs and what waits now.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from devstack.clickhouse_http.errors import (
    QUERY_WAS_CANCELLED,
    TOO_MANY_SIMULTANEOUS_QUERIES,
    ClickHouseError,
)

log = logging.getLogger("devstack.clickhouse_http")


@dataclass
class Totals:
    admitted: int = 0
    queued: int = 0  # admitted after waiting
    refused: int = 0  # waited longer than max_wait_s
    wait_s: float = 0.0
    max_wait_s: float = 0.0


@dataclass
class Admission:
    limit: int
    max_wait_s: float
    # ticket -> (query id, monotonic time it started running / arrived); tickets, not query ids,
    # because clients may reuse a query id
    running: dict[int, tuple[str, float]] = field(default_factory=dict)
    waiting: dict[int, tuple[str, float]] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)

    def __post_init__(self) -> None:
        self._slots = anyio.Semaphore(self.limit)  # FIFO: waiters are admitted in order
        self._tickets = itertools.count()
        self.closing = False  # the server is shutting down: admit nothing more

    def _refuse_if_closing(self) -> None:
        if self.closing:
            raise ClickHouseError.of(
                QUERY_WAS_CANCELLED, "QUERY_WAS_CANCELLED", "The server is shutting down"
            )

    @asynccontextmanager
    async def slot(self, query_id: str) -> AsyncIterator[None]:
        self._refuse_if_closing()
        ticket = next(self._tickets)
        arrived = time.monotonic()
        must_wait = self._slots.value == 0
        self.waiting[ticket] = (query_id, arrived)
        try:
            if must_wait:
                log.info(
                    "query %s waits for the engine: %d running, %d waiting (limit %d)",
                    query_id,
                    len(self.running),
                    len(self.waiting),
                    self.limit,
                )
            with anyio.move_on_after(self.max_wait_s) as scope:
                await self._slots.acquire()
        finally:
            del self.waiting[ticket]
        waited = time.monotonic() - arrived
        if scope.cancelled_caught:
            self.totals.refused += 1
            log.warning("query %s refused after waiting %.3f s for the engine", query_id, waited)
            raise ClickHouseError.of(
                TOO_MANY_SIMULTANEOUS_QUERIES,
                "TOO_MANY_SIMULTANEOUS_QUERIES",
                f"Too many simultaneous queries. Maximum: {self.limit}",
            )
        self._record(query_id, waited, must_wait)
        self.running[ticket] = (query_id, time.monotonic())
        try:
            self._refuse_if_closing()
            yield
        finally:
            del self.running[ticket]
            self._slots.release()

    def _record(self, query_id: str, waited: float, waited_in_line: bool) -> None:
        totals = self.totals
        totals.admitted += 1
        if waited_in_line:
            totals.queued += 1
            totals.wait_s += waited
            totals.max_wait_s = max(totals.max_wait_s, waited)
            log.info("query %s waited %.3f s for the engine", query_id, waited)

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "max_concurrent_queries": self.limit,
            "queue_max_wait_s": self.max_wait_s,
            "running": [
                {"query_id": q, "running_s": round(now - t, 3)} for q, t in self.running.values()
            ],
            "waiting": [
                {"query_id": q, "waiting_s": round(now - t, 3)} for q, t in self.waiting.values()
            ],
            "admitted": self.totals.admitted,
            "queued": self.totals.queued,
            "refused": self.totals.refused,
            "queue_wait_s_total": round(self.totals.wait_s, 3),
            "queue_wait_s_max": round(self.totals.max_wait_s, 3),
        }
