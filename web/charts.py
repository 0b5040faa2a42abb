"""Chart specifications for Plotly (plotly.js, served from the `plotly` package's own copy).

Each function returns `{"data": [...], "layout": {...}}` in plotly.js's JSON schema; the page
hands it to `Plotly.react`. Colour is never the only signal: every stage or bucket also has a
legend entry, a bar pattern or line dash, and its number as text; each chart is followed by
the same figures as a table.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
STAGE_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
OTHER_COLOUR = "#7f7f7f"
PATTERNS = ("", "/", "\\", "x", ".", "+", "-", "|")
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
# Light to dark: older files read darker (and each segment carries its count).
BUCKET_COLOURS = ("#c6dbef", "#9ecae1", "#6baed6", "#3182bd", "#08519c", "#08306b")
STEP_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#999999")
MARKERS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross", "triangle-down")
LEGEND_TOP = {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0, "traceorder": "normal"}


def pattern(shape: str) -> dict[str, Any]:
    """A light hatch over the colour: a second signal that stays readable on a thin bar."""
    return {
        "shape": shape,
        "fillmode": "overlay",
        "fgcolor": "rgba(255,255,255,0.8)",
        "solidity": 0.3,
        "size": 7,
    }


Spec = dict[str, Any]


def _layout(height: int = 320, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "height": height,
        "margin": {"l": 8, "r": 8, "t": 8, "b": 8},
        "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "legend": {"orientation": "h", "y": -0.15, "x": 0},
        "xaxis": {"automargin": True, "gridcolor": "#e5e5e5"},
        "yaxis": {"automargin": True, "gridcolor": "#e5e5e5"},
        "hovermode": "closest",
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(layout.get(key), dict):
            layout[key] = {**layout[key], **value}
        else:
            layout[key] = value
    return layout


def stage_style(index: int) -> tuple[str, str, str]:
    """(colour, bar pattern, line dash) of the stage at `index` (0-based order)."""
    if index < 0 or index >= len(STAGE_COLOURS):
        return OTHER_COLOUR, "x", "dot"
    return STAGE_COLOURS[index], PATTERNS[index % len(PATTERNS)], DASHES[index % len(DASHES)]


def funnel(stages: list[dict[str, Any]]) -> Spec:
    """Files per stage, open and closed stacked; `stages`: name, label, open, closed, order."""
    labels = [f"{s['name']} ({s['open'] + s['closed']:,})" for s in stages]
    data = [
        {
            "type": "funnel",
            "name": "open",
            "y": labels,
            "x": [s["open"] for s in stages],
            "textinfo": "value",
            "marker": {"color": "#0072B2"},
            "connector": {"visible": False},
            "hovertemplate": "%{y}: %{x:,} open<extra></extra>",
        },
        {
            "type": "funnel",
            "name": "closed (done or rejected)",
            "y": labels,
            "x": [s["closed"] for s in stages],
            "textinfo": "value",
            "marker": {"color": "#E69F00", "pattern": pattern("/")},
            "connector": {"visible": False},
            "hovertemplate": "%{y}: %{x:,} closed<extra></extra>",
        },
    ]
    return {"data": data, "layout": _layout(funnelmode="stack")}


def lines_by_stage(
    rows: list[dict[str, Any]], value: str, title: str, *, step: bool = True, markers: bool = False
) -> Spec:
    """One line per stage over `date` (colour, dash and marker symbol per stage); `step`: a
    value holds until the next day with data."""
    series: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    order: dict[str, int] = {}
    for r in rows:
        series[r["stage"]].append((r["date"], r[value]))
        order[r["stage"]] = int(r["stage_order"])
    data = []
    for stage in sorted(series, key=lambda s: (order[s] == 0, order[s], s)):
        colour, _, dash = stage_style(order[stage] - 1)
        points = series[stage]
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers" if markers else "lines",
                "line": {
                    "color": colour,
                    "dash": dash,
                    "width": 2,
                    "shape": "hv" if step else "linear",
                },
                "marker": {"symbol": MARKERS[max(order[stage] - 1, 0) % len(MARKERS)], "size": 6},
                "name": stage,
                "x": [p[0] for p in points],
                "y": [p[1] for p in points],
                "hovertemplate": f"%{{x}} {stage}: %{{y:,}} {title}<extra></extra>",
            }
        )
    return {
        "data": data,
        "layout": _layout(xaxis={"type": "date"}, yaxis={"title": {"text": title}}),
    }


def stacked_by_stage(
    rows: list[dict[str, Any]], value: str, title: str, stage_orders: dict[str, int]
) -> Spec:
    """Bars per `date`, one stacked segment per stage (pattern and colour per stage)."""
    series: dict[str, dict[str, Any]] = defaultdict(dict)
    for r in rows:
        series[r["stage"]][r["date"]] = series[r["stage"]].get(r["date"], 0) + r[value]
    dates = sorted({r["date"] for r in rows})
    data = []

    def rank(stage: str) -> tuple[bool, int, str]:
        return stage_orders.get(stage, 0) == 0, stage_orders.get(stage, 0), stage

    for stage in sorted(series, key=rank):
        colour, shape, _ = stage_style(stage_orders.get(stage, 0) - 1)
        data.append(
            {
                "type": "bar",
                "name": stage,
                "x": dates,
                "y": [series[stage].get(d, 0) for d in dates],
                "marker": {"color": colour, "pattern": pattern(shape)},
                "hovertemplate": f"%{{x}} {stage}: %{{y:,}} {title}<extra></extra>",
            }
        )
    return {
        "data": data,
        "layout": _layout(
            barmode="stack", xaxis={"type": "date"}, yaxis={"title": {"text": title}}
        ),
    }


def ageing(stages: list[str], buckets: list[str], files: dict[tuple[str, str], int]) -> Spec:
    """Horizontal bars per stage, one stacked segment per age bucket (youngest first)."""
    data = []
    widest = max((sum(files.get((s, b), 0) for b in buckets) for s in stages), default=0)
    for i, bucket in enumerate(buckets):
        values = [files.get((s, bucket), 0) for s in stages]
        data.append(
            {
                "type": "bar",
                "orientation": "h",
                "name": bucket,
                "y": stages,
                "x": values,
                # A number only where it fits; the hover and the table have every figure.
                "text": [f"{v:,}" if v and v >= widest * 0.05 else "" for v in values],
                "textposition": "inside",
                "textangle": 0,
                "insidetextanchor": "middle",
                "marker": {
                    "color": BUCKET_COLOURS[i % len(BUCKET_COLOURS)],
                    "line": {"color": "#ffffff", "width": 1},
                },
                "textfont": {"color": "#000000" if i < 3 else "#ffffff"},
                "hovertemplate": f"%{{y}}, in stage {bucket}: %{{x:,}} files<extra></extra>",
            }
        )
    return {
        "data": data,
        "layout": _layout(
            barmode="stack",
            legend=LEGEND_TOP,
            yaxis={"autorange": "reversed"},
            xaxis={"title": {"text": "files (not delivered)"}},
        ),
    }


def run_steps(runs: list[dict[str, Any]], steps: list[dict[str, Any]]) -> Spec:
    """Seconds per step of each recent run (oldest at the bottom), stacked."""
    label = {r["run_id"]: r["label"] for r in runs}
    names: list[str] = []
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    for s in steps:
        if s["run_id"] not in label:
            continue
        name = s["step"]
        if name not in names:
            names.append(name)
        seconds[(s["run_id"], name)] += float(s["duration_s"])
    ordered = [r["run_id"] for r in runs]
    data = []
    for i, name in enumerate(names):
        data.append(
            {
                "type": "bar",
                "orientation": "h",
                "name": name,
                "y": [label[r] for r in ordered],
                "x": [round(seconds.get((r, name), 0.0), 3) for r in ordered],
                "marker": {
                    "color": STEP_COLOURS[i % len(STEP_COLOURS)],
                    "pattern": pattern(PATTERNS[i % len(PATTERNS)]),
                },
                "hovertemplate": f"%{{y}} {name}: %{{x:.2f}} s<extra></extra>",
            }
        )
    return {
        "data": data,
        "layout": _layout(
            height=max(240, 90 + 28 * len(ordered)),
            barmode="stack",
            legend=LEGEND_TOP,
            yaxis={"autorange": "reversed", "type": "category"},
            xaxis={"title": {"text": "seconds"}},
        ),
    }


def dbt_nodes(nodes: list[dict[str, Any]]) -> Spec:
    names = [n["name"] if len(n["name"]) <= 42 else n["name"][:40] + "…" for n in nodes]
    values = [round(float(n["duration_s"]), 3) for n in nodes]
    return {
        "data": [
            {
                "type": "bar",
                "orientation": "h",
                "name": "dbt node",
                "y": names,
                "x": values,
                "text": [f"{v:.2f} s" for v in values],
                "textposition": "auto",
                "marker": {"color": "#009E73"},
                "hovertemplate": "%{y}: %{x:.3f} s<extra></extra>",
            }
        ],
        "layout": _layout(
            height=max(220, 40 + 24 * len(nodes)),
            showlegend=False,
            yaxis={"autorange": "reversed", "type": "category"},
            xaxis={"title": {"text": "seconds"}},
        ),
    }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def timeline(tasks: list[dict[str, Any]], now_ms: int, stage_orders: dict[str, int]) -> Spec:
    """One bar per task, from its assignment to its last update (finished) or now (open)."""
    data = []
    for t in tasks:
        colour, shape, _ = stage_style(stage_orders.get(t["stage"], 0) - 1)
        end = t["end_ms"] if t["end_ms"] else now_ms
        data.append(
            {
                "type": "bar",
                "orientation": "h",
                "name": t["label"],
                "y": [t["label"]],
                "base": [_iso(t["assigned_ms"])],
                "x": [max(end - t["assigned_ms"], 60_000)],
                "marker": {
                    "color": colour,
                    "pattern": pattern(shape),
                    "opacity": 0.45 if t["is_deleted"] else 1.0,
                },
                "text": [t["status_text"]],
                "textposition": "auto",
                "hovertemplate": f"{t['label']}: {t['status_text']}<extra></extra>",
                "showlegend": False,
            }
        )
    return {
        "data": data,
        "layout": _layout(
            height=max(180, 50 + 34 * len(tasks)),
            barmode="overlay",
            xaxis={"type": "date"},
            yaxis={"autorange": "reversed", "type": "category"},
        ),
    }
