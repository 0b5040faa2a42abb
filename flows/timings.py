"""Step timings: measured with a context manager, written to `ops.step_timings`, shown in Prefect.

`kind` is `step` for the flow's own steps (lock, detect, load:<collection>, dbt_build, ...) and
`dbt_node` for each model/test dbt ran, so every dbt node's timing is queryable and visible in the
run's table artifact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from clickhouse_connect.driver.client import Client

from flows.ops import STEP_COLUMNS, insert_rows, now


class StepStatus(StrEnum):
    """Status of a flow step in `ops.step_timings` (the dashboard reads these strings)."""

    running = "running"
    ok = "ok"
    failed = "failed"
    skipped = "skipped"


@dataclass
class StepTiming:
    step: str
    started_at: datetime
    kind: str = "step"
    # A flow step's StepStatus; a dbt node keeps dbt's own (success, error, pass, fail, warn...).
    status: StepStatus | str = StepStatus.running
    ended_at: datetime | None = None
    duration_s: float = 0.0
    rows: int = 0
    message: str = ""

    def as_row(self, run_id: str) -> tuple[Any, ...]:
        return (
            run_id,
            self.step,
            self.kind,
            self.status,
            self.started_at,
            self.ended_at or self.started_at,
            self.duration_s,
            self.rows,
            self.message,
        )

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat()
        d["ended_at"] = self.ended_at.isoformat() if self.ended_at else None
        d["duration_s"] = round(self.duration_s, 3)
        return d


@dataclass
class TimingRecorder:
    run_id: str
    steps: list[StepTiming] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[StepTiming]:
        """Time a step; it is `ok` unless it raises (then `failed`, with the error as message).
        The body may set `rows`, `status` or `message` on the yielded record."""
        timing = StepTiming(step=name, started_at=now())
        self.steps.append(timing)
        t0 = time.perf_counter()
        try:
            yield timing
        except BaseException as exc:
            timing.status = StepStatus.failed
            error = f"{type(exc).__name__}: {exc}"
            timing.message = f"{timing.message} | {error}" if timing.message else error
            raise
        else:
            if timing.status == StepStatus.running:
                timing.status = StepStatus.ok
        finally:
            timing.duration_s = time.perf_counter() - t0
            timing.ended_at = timing.started_at + timedelta(seconds=timing.duration_s)

    def add(self, timing: StepTiming) -> None:
        self.steps.append(timing)

    def write(self, client: Client) -> None:
        insert_rows(
            client, "ops.step_timings", STEP_COLUMNS, (s.as_row(self.run_id) for s in self.steps)
        )

    def table(self) -> list[dict[str, Any]]:
        """Rows of the Prefect table artifact."""
        return [
            {
                "step": s.step,
                "kind": s.kind,
                "status": s.status,
                "duration_s": round(s.duration_s, 3),
                "rows": s.rows,
                "message": s.message[:200],
            }
            for s in self.steps
        ]

    def publish_artifact(self) -> None:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            table=self.table(),
            key="sync-pipeline-timings",
            description=f"Step and dbt node timings of run `{self.run_id}`",
        )
