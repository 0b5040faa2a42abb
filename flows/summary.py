"""The few lines `python -m flows.pipeline` prints for a person (the whole summary is `--json`)."""

from __future__ import annotations

from typing import Any


def short_summary(summary: dict[str, Any]) -> str:
    """A few lines for a person: outcome, what was loaded and built, in step or not, alerts."""
    lines = [f"sync {summary['status']} in {summary['duration_s']:.1f} s (run {summary['run_id']})"]
    loads = summary.get("loads") or {}
    if loads:
        parts = [
            f"{name} {info['docs_read']:,} read, {info['rejects']:,} rejected, "
            f"{info['deletes']:,} deleted"
            for name, info in loads.items()
        ]
        lines.append("loaded: " + "; ".join(parts))
    # Deletes and late writes the watermark cannot see, found by the count check or the
    # scheduled reconcile: without this line a bulk delete would read as "0 deleted".
    repairs = {name: r for name, r in (summary.get("repairs") or {}).items() if any(r.values())}
    if repairs:
        parts = [
            f"{name} {r['tombstones']:,} deleted in MongoDB, {r['rows_loaded']:,} rows reloaded"
            for name, r in repairs.items()
        ]
        lines.append("repaired by reconcile: " + "; ".join(parts))
    if summary.get("built"):
        refresh = " (full refresh)" if summary.get("full_refresh") else ""
        lines.append(f"built: {' '.join(summary['built'])}{refresh}")
    if summary["status"] != "ok":
        lines.append(summary["message"])
    elif summary.get("in_step"):
        lines.append(summary["in_step"])
    alerts = summary.get("alerts") or []
    lines.append(f"alerts: {len(alerts)}" + "".join(f"\n  - {a}" for a in alerts[:5]))
    if len(alerts) > 5:
        lines.append(f"  ... {len(alerts) - 5} more (ops.alerts)")
    lines.append("the whole summary: python -m flows.pipeline --json")
    return "\n".join(lines)
