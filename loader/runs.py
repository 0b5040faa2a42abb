"""Run records (`ops.sync_runs`) and the per-run peak memory probe."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import psutil
from clickhouse_connect.driver.client import Client

from loader.cluster import insert_settings, rows_payload
from loader.schema import SYNC_RUNS


class RunStatus(StrEnum):
    """`ops.sync_runs.status`: the dashboard and the alerts read these strings."""

    ok = "ok"
    skipped = "skipped"
    failed = "failed"


class RunKind(StrEnum):
    """`ops.sync_runs.kind`: what wrote the record."""

    sync = "sync"
    reconcile = "reconcile"
    watch = "watch"  # the change-stream follower


def new_run_id() -> str:
    return uuid.uuid4().hex


class PeakRss:
    """Peak resident memory of this process *during* a run, sampled at the points where a batch
    is fully materialised. `ru_maxrss` would be the peak of the whole process lifetime, which
    says nothing about this run when several runs share a process."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.peak = 0
        self.sample()

    def sample(self) -> int:
        rss = self._proc.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss


@dataclass
class RunRecord:
    run_id: str
    collection: str
    kind: RunKind = RunKind.sync
    status: RunStatus = RunStatus.ok
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    ended_at: datetime | None = None
    docs_read: int = 0
    rows_written: int = 0
    rejects: int = 0
    deletes: int = 0
    watermark_before: str = ""
    watermark_after: str = ""
    peak_rss_bytes: int = 0
    message: str = ""
    shard: str = ""  # "I/N" for a shard worker (`loader.shards`), "" unsharded

    @property
    def duration_s(self) -> float:
        end = self.ended_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()

    def finish(self, status: RunStatus, message: str = "") -> None:
        self.status = status
        self.ended_at = datetime.now(UTC)
        if message:
            self.message = message


def write_run(client: Client, rec: RunRecord) -> None:
    """Append one row to `ops.sync_runs`."""
    cols = [n for n, _ in SYNC_RUNS.columns]
    row = [
        rec.run_id,
        rec.collection,
        rec.kind,
        rec.status,
        rec.started_at,
        rec.ended_at or datetime.now(UTC),
        rec.duration_s,
        rec.docs_read,
        rec.rows_written,
        rec.rejects,
        rec.deletes,
        rec.watermark_before,
        rec.watermark_after,
        rec.peak_rss_bytes,
        rec.message[:10_000],
        rec.shard,
    ]
    dedup = insert_settings(None, SYNC_RUNS.qualified, rows_payload(cols, [row]))
    client.insert(SYNC_RUNS.qualified, [row], column_names=cols, settings=dedup)
