"""Results of a bench run: the table printed at the end and `bench/results/latest.json`.

JSON layout (keys are stable; a measurement that could not run keeps its key, with `status`
"unavailable: <reason>" and null figures):

    schema            1
    generated_at      ISO 8601 UTC time the report was written
    command           how the run was started
    config            scale, small_scale, repeat, dashboard_runs, groups (those selected)
    machine           cpus, python, platform
    dataset           tasks, files, employees, small_tasks, seed_seconds (time to seed Mongo)
    decoder_default   the decoder the loader uses ("pymongo" or "pymongoarrow")
    measurements      {key: {title, unit, status, runs, median, min, max, p50, p95, p99, note,
                      detail}}
    comparisons       {key: {title, subject, baseline, ratio, target, passed, status, note}}

`runs` holds one figure per run in `unit`; `p50`/`p95`/`p99` are set for latencies (else null).
`ratio` is subject ÷ baseline of their medians (p50 for latencies); `target` is a text like
">= 0.7" or "" when there is none; `passed` is true/false against it, null without a target or
figure.

Measurement keys (listed in `bench.catalogue.MEASUREMENT_KEYS`):
- load.loader, load.cursor_drain, load.seed_v1, load.dlt: docs/s of an initial load;
- sync.full, sync.noop, sync.has_changes, sync.incremental_1pct: seconds;
- noop.scheduled_run: seconds of `python -m flows.pipeline` finding nothing to do (wall);
- dashboard.pipeline_state, dashboard.naive, dashboard.cached: ms per page load;
- web.overview, web.file, web.employee, web.search (each also `_uncached`): the web
  dashboard's server time per request, ms (`bench.web`);
- memory.loader_small, memory.loader_full, memory.seed_v1_small, memory.seed_v1_full: peak RSS
  of the whole worker process, MiB;
- dbt.full_refresh, dbt.incremental_1pct: seconds;
- freshness.50_per_s, freshness.500_per_s: ms from a write's acknowledgement by MongoDB to the
  first read of `analytics.pipeline_state` that shows it, one run per probe write;
- decode.pymongo, decode.pymongoarrow: docs/s.

Comparison keys (listed in `bench.catalogue.COMPARISON_KEYS`): loader_vs_cursor_drain,
loader_vs_seed_v1, loader_vs_dlt, noop_vs_full, probe_vs_full, incremental_vs_full,
naive_vs_pipeline_state, cached_vs_pipeline_state, loader_rss_full_vs_small,
seed_v1_rss_full_vs_small, seed_v1_vs_loader_rss_full, dbt_incremental_vs_full,
pymongoarrow_vs_pymongo, web_<page>_uncached_vs_cached (overview, file, employee, search).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

OK = "ok"


@dataclass
class Measurement:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    status: str = "unavailable: not run"
    runs: list[float] = field(default_factory=list)
    latency: bool = False  # report p50/p95/p99 (runs are the samples)
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK and bool(self.runs)

    def stat(self, name: str) -> float | None:
        if not self.ok:
            return None
        if name == "median":
            return statistics.median(self.runs)
        if name == "min":
            return min(self.runs)
        if name == "max":
            return max(self.runs)
        if name in ("p50", "p95", "p99") and self.latency:
            return percentile(self.runs, int(name[1:]))
        return None

    @property
    def central(self) -> float | None:
        """The figure comparisons use: p50 for latencies, else the median."""
        return self.stat("p50" if self.latency else "median")

    def unavailable(self, reason: str) -> None:
        self.status = f"unavailable: {reason}"
        self.runs = []

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "unit": self.unit,
            "status": self.status,
            "runs": [round(r, 6) for r in self.runs] if self.ok else [],
            "median": _round(self.stat("median")),
            "min": _round(self.stat("min")),
            "max": _round(self.stat("max")),
            "p50": _round(self.stat("p50")),
            "p95": _round(self.stat("p95")),
            "p99": _round(self.stat("p99")),
            "note": self.note,
            "detail": self.detail,
        }


@dataclass
class Comparison:
    key: str
    title: str
    subject: str
    baseline: str
    row: str  # the measurement row the ratio is shown on
    op: str = ""  # ">=" or "<=", empty without a target
    threshold: float | None = None
    note: str = ""
    ratio: float | None = None
    status: str = "unavailable: not run"

    @property
    def target(self) -> str:
        return f"{self.op} {self.threshold:g}" if self.op and self.threshold is not None else ""

    @property
    def passed(self) -> bool | None:
        if self.ratio is None or not self.op or self.threshold is None:
            return None
        return self.ratio >= self.threshold if self.op == ">=" else self.ratio <= self.threshold

    def evaluate(self, measurements: dict[str, Measurement]) -> None:
        subject, baseline = measurements[self.subject], measurements[self.baseline]
        for m in (subject, baseline):
            if not m.ok:
                self.status = f"unavailable: {m.key} {m.status}"
                self.ratio = None
                return
        s, b = subject.central, baseline.central
        if s is None or b is None or b == 0:
            self.status = "unavailable: a figure is zero or missing"
            return
        self.ratio = s / b
        self.status = OK

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "subject": self.subject,
            "baseline": self.baseline,
            "ratio": _round(self.ratio),
            "target": self.target,
            "passed": self.passed,
            "status": self.status,
            "note": self.note,
        }


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * pct / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}×" if value < 0.1 else f"{value:.2f}×"


def render(
    measurements: dict[str, Measurement],
    comparisons: dict[str, Comparison],
    console: Console,
    title: str,
) -> None:
    by_row: dict[str, list[Comparison]] = {}
    for c in comparisons.values():
        by_row.setdefault(c.row, []).append(c)
    table = Table(title=title, title_justify="left", show_lines=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("measurement", "left"),
        ("unit", "left"),
        ("median", "right"),
        ("min", "right"),
        ("max", "right"),
        ("p95", "right"),
        ("p99", "right"),
        ("ratio (vs baseline)", "left"),
        ("target", "left"),
        ("result", "left"),
    )
    for col, justify in columns:
        table.add_column(col, justify=justify, overflow="fold")
    for m in measurements.values():
        comps = by_row.get(m.key, [])
        if not m.ok:
            status = m.status if len(m.status) <= 160 else m.status[:157] + "..."
            label = f"{m.title}\n[dim]{escape(status)}[/dim]"
            table.add_row(label, m.unit, "—", "—", "—", "—", "—", "", "", "")
            continue
        first = m.stat("p50") if m.latency else m.stat("median")
        cells = [m.title, m.unit, _fmt(first), _fmt(m.stat("min")), _fmt(m.stat("max"))]
        cells.append(_fmt(m.stat("p95")) if m.latency else "")
        cells.append(_fmt(m.stat("p99")) if m.latency else "")
        if not comps:
            table.add_row(*cells, "", "", "")
        for i, c in enumerate(comps):
            result = {True: "[green]pass[/green]", False: "[red]miss[/red]", None: ""}[c.passed]
            if c.status != OK:
                result = "[dim]unavailable[/dim]"
            ratio = f"{_fmt_ratio(c.ratio)} {c.title}"
            row = cells if i == 0 else [""] * len(cells)
            table.add_row(*row, ratio, c.target, result)
    console.print(table)


def write_json(
    path: Path,
    *,
    config: dict[str, Any],
    dataset: dict[str, Any],
    decoder_default: str | None,
    measurements: dict[str, Measurement],
    comparisons: dict[str, Comparison],
) -> dict[str, Any]:
    doc = {
        "schema": 1,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench"]),
        "config": config,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "dataset": dataset,
        "decoder_default": decoder_default,
        "measurements": {k: m.as_json() for k, m in measurements.items()},
        "comparisons": {k: c.as_json() for k, c in comparisons.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
    return doc
