"""Overlap guard: at most one `sync_pipeline` run does work at a time.

First choice is a Redis lock (SET NX with a TTL, released only by its holder, so a crashed run
frees it when the TTL ends). With Redis down, a Prefect global concurrency limit of 1 takes over;
it lives in the Prefect API's database, so it also works under the ephemeral API and the test
harness. If the Prefect API cannot serve it either, an exclusive file lock guards this host.
Acquisition never waits: a run that finds the guard taken is recorded as skipped.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from redis.exceptions import LockError

from flows.redis_link import REDIS_ERRORS, RedisLink
from flows.settings import FlowSettings


@dataclass
class Guard:
    acquired: bool
    mechanism: str  # "redis", "prefect-concurrency-limit" or "file"
    holder: str = ""  # the run holding the guard, when known

    @property
    def skip_message(self) -> str:
        held_by = f" ({self.holder})" if self.holder else ""
        return f"skipped: another run holds the lock{held_by} [{self.mechanism}]"


@contextmanager
def run_guard(
    settings: FlowSettings,
    link: RedisLink,
    run_id: str,
    logger: logging.Logger | logging.LoggerAdapter,
) -> Iterator[Guard]:
    """Take the overlap guard without waiting; yield whether it was acquired and how."""
    client = link.client()
    if client is not None:
        key = settings.key("lock", "sync")
        lock = client.lock(key, timeout=settings.lock_ttl_seconds, thread_local=False)
        try:
            acquired = lock.acquire(blocking=False, token=run_id)
        except REDIS_ERRORS:
            acquired = None  # Redis died between PING and SET: fall through to the fallback
        if acquired is not None:
            if not acquired:
                # str: the link's client decodes responses (the stubs also allow bytes).
                holder = link.call(lambda c: str(c.get(key) or ""), "")
                yield Guard(False, "redis", holder)
                return
            try:
                yield Guard(True, "redis", run_id)
            finally:
                try:
                    lock.release()
                except LockError as exc:
                    # Expired: the TTL freed it; nothing else to undo.
                    logger.warning("Could not release the Redis lock %s: %s", key, exc)
                except REDIS_ERRORS as exc:
                    # Redis gone: the TTL frees it. If the link already warned that Redis is
                    # down, that stays the run's single warning about it.
                    if not link.warned:
                        logger.warning("Could not release the Redis lock %s: %s", key, exc)
            return
        link.call(lambda c: c.ping(), None)  # records the failure, warns once

    with ExitStack() as stack:
        try:
            acquired = stack.enter_context(_prefect_limit(settings))
            mechanism = "prefect-concurrency-limit"
        except _GuardUnavailable as exc:
            logger.warning(
                "Prefect concurrency limit %r unavailable (%s); guarding with a file lock.",
                settings.concurrency_limit_name,
                exc,
            )
            acquired = stack.enter_context(_file_lock(settings))
            mechanism = "file"
        yield Guard(acquired, mechanism, run_id if acquired else "")


class _GuardUnavailable(Exception):
    pass


@contextmanager
def _prefect_limit(settings: FlowSettings) -> Iterator[bool]:
    """One slot of a global concurrency limit of 1, leased for `lock_ttl_seconds` so a crashed
    run frees it like the Redis lock's TTL. The client calls are used directly (not
    `prefect.concurrency.sync.concurrency`) because acquisition must not wait: 423 = taken."""
    import httpx
    from prefect.client.orchestration import get_client

    name = settings.concurrency_limit_name
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
            response = client.increment_concurrency_slots_with_lease(
                names=[name],
                slots=1,
                mode="concurrency",
                lease_duration=float(settings.lock_ttl_seconds),
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:  # LOCKED: another run holds the slot
                yield False
                return
            raise _GuardUnavailable(str(exc)) from exc
        except Exception as exc:  # no API at all: this mechanism is unusable
            raise _GuardUnavailable(str(exc)) from exc
        lease_id = response.json()["lease_id"]
        try:
            yield True
        finally:
            client.release_concurrency_slots_with_lease(lease_id)


@contextmanager
def _file_lock(settings: FlowSettings) -> Iterator[bool]:
    run_dir = settings.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "sync_pipeline.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
