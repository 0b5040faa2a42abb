"""Syncs that failed before they could read, recorded in `ops.sync_runs` all the same.

`sync_collection` records its own failures (with whether the watermark moved). A run can also
fail before it gets there: MongoDB does not answer, refuses the credentials, or MONGO_URI
cannot be parsed, while ClickHouse is up. Then each collection the run was for gets a `failed`
row with its unchanged watermark, and the exception a note saying no watermark moved, so the
error line says it too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager

from clickhouse_connect.driver.client import Client

from loader.clients import Clients, connect_clickhouse, open_clients_now
from loader.errors import (
    add_note,
    classify,
    failure_message,
    watermark_notes,
    watermark_outcome,
    watermark_unmoved,
)
from loader.runs import RunKind, RunRecord, RunStatus, new_run_id, write_run
from loader.schema import ensure_schema
from loader.settings import Settings
from loader.watermark import load_watermark

log = logging.getLogger(__name__)


def record_failed_start(
    clickhouse: Client,
    collections: Sequence[str],
    exc: BaseException,
    kind: RunKind = RunKind.sync,
    run_id: str | None = None,
) -> bool:
    """Record `exc` as the failure of a run on `collections` that read nothing, if MongoDB is
    what failed and no run record says so yet; True when rows were written. Never raises.
    `run_id`: the caller's (a flow run's id), else a new one per collection."""
    problem = classify(exc)
    if watermark_notes(exc) or problem is None or problem.server != "MongoDB":
        return False
    add_note(exc, watermark_unmoved(collections))
    try:
        ensure_schema(clickhouse)
        for collection in collections:
            before = load_watermark(clickhouse, collection)
            _, note = watermark_outcome(collection, before, None)
            rec = RunRecord(run_id or new_run_id(), collection, kind=kind)
            rec.watermark_before = rec.watermark_after = before.describe() if before else ""
            rec.finish(RunStatus.failed, failure_message(exc, note))
            write_run(clickhouse, rec)
    except Exception as err:  # noqa: BLE001 - the original error matters more
        log.error("could not record the failed run in ops.sync_runs: %s", err)
        return False
    return True


@contextmanager
def sync_clients(
    settings: Settings, collections: Sequence[str], kind: RunKind = RunKind.sync
) -> Iterator[Clients]:
    """`open_clients` for a run of `kind` (sync, reconcile, watch) on `collections`: a
    connection failure is recorded as the failed run of each (see `record_failed_start`) and
    says that no watermark moved."""
    try:
        clients = open_clients_now(settings)
    except Exception as exc:
        problem = classify(exc)
        if problem is not None and problem.server == "MongoDB":  # ClickHouse answered
            try:
                clickhouse = connect_clickhouse(settings)
            except Exception as err:  # noqa: BLE001 - the original error matters more
                log.error("could not record the failed run in ops.sync_runs: %s", err)
            else:
                with closing(clickhouse):
                    record_failed_start(clickhouse, collections, exc, kind, new_run_id())
        add_note(exc, watermark_unmoved(collections))
        raise
    try:
        yield clients
    finally:
        clients.close()
