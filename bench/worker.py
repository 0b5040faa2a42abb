"""One measured operation in a fresh process: `python -m bench.worker '<json job>'`.

A fresh process per run keeps runs from polluting each other (memory, caches, connection
pools), and its peak RSS (`ru_maxrss`) is the peak of that one operation plus the interpreter
and its imports, the same way for the loader and for every baseline. Setup that is not part of
what is measured (emptying tables) happens before the clock starts.

The job is a JSON object `{"kind": ..., **params}`; the result is printed as one line
`BENCH_RESULT {"seconds": .., "items": .., "peak_rss_bytes": .., "extra": {..}}`.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "BENCH_RESULT "


def _settings() -> Any:
    from loader.settings import Settings

    return Settings()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def loader_sync(params: dict[str, Any]) -> tuple[Any, float]:
    from loader.sync import sync_collection

    settings = _settings()
    full = bool(params.get("full_refresh"))
    result, seconds = _timed(
        lambda: sync_collection(settings, params.get("collection", "tasks"), full_refresh=full)
    )
    if result.status != "ok":
        raise RuntimeError(f"sync ended with status {result.status}: {result.message}")
    extra = {
        "docs_read": result.docs_read,
        "rows_written": result.rows_written,
        "rejects": result.rejects,
        "sync_peak_rss_bytes": result.peak_rss_bytes,
        "loader_duration_s": result.duration_s,
    }
    return (result.docs_read, extra), seconds


def loader_shard(params: dict[str, Any]) -> tuple[Any, float]:
    """One shard worker (`sync --shard I/N`); its wall-clock start and end let the harness
    time N of them running at once without their interpreter start-up."""
    from loader.shards import parse_shard
    from loader.sync import sync_collection

    settings = _settings()
    shard = parse_shard(params["shard"])
    started_at = time.time()
    result, seconds = _timed(lambda: sync_collection(settings, "tasks", shard=shard))
    extra = {"started_at": started_at, "ended_at": time.time(), "docs_read": result.docs_read}
    return (result.docs_read, extra), seconds


def snapshot_plan(params: dict[str, Any]) -> tuple[Any, float]:
    """The snapshot's plan step: the change-stream resume point and the `$sample` split
    points of `workers` ranges."""
    from loader.snapshot import plan_snapshot

    settings = _settings()
    ranges, seconds = _timed(lambda: plan_snapshot(settings, "tasks", int(params["workers"])))
    return (len(ranges), {}), seconds


def snapshot_range(params: dict[str, Any]) -> tuple[Any, float]:
    """One range worker of the stored plan (`snapshot --range k/N`), timed like a shard."""
    from loader.snapshot import load_range
    from loader.snapshot_ranges import parse_range

    settings = _settings()
    spec = parse_range(params["range"])
    started_at = time.time()
    result, seconds = _timed(lambda: load_range(settings, "tasks", spec))
    extra = {"started_at": started_at, "ended_at": time.time(), "docs_read": result.docs_read}
    return (result.docs_read, extra), seconds


def snapshot_command(params: dict[str, Any]) -> tuple[Any, float]:
    """`snapshot --workers N [--threads]` as one call: plan, N ranges in processes or threads."""
    from loader.snapshot import run_snapshot

    settings = _settings()
    threads = bool(params.get("threads"))
    workers = int(params["workers"])
    results, seconds = _timed(
        lambda: run_snapshot(settings, "tasks", workers, processes=not threads)
    )
    return (sum(r.docs_read for r in results), {}), seconds


def has_changes(params: dict[str, Any]) -> tuple[Any, float]:
    from loader.changes import has_changes as probe

    settings = _settings()
    changed, seconds = _timed(lambda: probe(settings, "tasks"))
    return (0, {"changed": changed}), seconds


def dbt_build(params: dict[str, Any]) -> tuple[Any, float]:
    from flows.dbt_build import run_build, selectors
    from flows.settings import FlowSettings

    settings = FlowSettings()
    # The flow's selection: every test with --full-refresh, else the incremental one.
    full = bool(params["full_refresh"])
    select = selectors(settings, params["sources"], every_test=full)
    build, seconds = _timed(lambda: run_build(settings, select, full))
    slowest = sorted(build.nodes, key=lambda n: -n.duration_s)[:8]
    nodes = {"nodes": len(build.nodes), "slowest": [(n.step, n.duration_s) for n in slowest]}
    return (len(build.nodes), nodes), seconds


def drain(params: dict[str, Any]) -> tuple[Any, float]:
    from bench.baselines.cursor_drain import drain as run

    settings = _settings()
    n, seconds = _timed(lambda: run(settings))
    return (n, {}), seconds


def seed_v1(params: dict[str, Any]) -> tuple[Any, float]:
    from bench.baselines import seed_v1 as baseline

    settings = _settings()
    baseline.reset(settings)
    n, seconds = _timed(lambda: baseline.sync(settings))
    return (n, {}), seconds


def dlt_try_load(params: dict[str, Any]) -> tuple[Any, float]:
    from bench.baselines import dlt_pipeline
    from bench.baselines.cursor_drain import projection

    settings = _settings()
    error, seconds = _timed(
        lambda: dlt_pipeline.try_load(
            settings, Path(params["pipelines_dir"]), params["native_port"], projection("tasks")
        )
    )
    return (0, {"error": error}), seconds


def dlt_run(params: dict[str, Any]) -> tuple[Any, float]:
    from bench.baselines import dlt_pipeline
    from bench.baselines.cursor_drain import projection

    settings = _settings()
    n, seconds = _timed(
        lambda: dlt_pipeline.run(
            settings,
            Path(params["pipelines_dir"]),
            params["native_port"],
            projection("tasks"),
            load=bool(params.get("load")),
        )
    )
    return (n, {}), seconds


def decode(params: dict[str, Any]) -> tuple[Any, float]:
    from bench import decode as dec

    settings = _settings()
    fn = {"pymongo": dec.decode_pymongo, "pymongoarrow": dec.decode_pymongoarrow}[params["how"]]
    n, seconds = _timed(lambda: fn(settings))
    return (n, {"loader_default": dec.loader_default()}), seconds


def dashboard(params: dict[str, Any]) -> tuple[Any, float]:
    from bench.dashboard import latencies

    out, seconds = _timed(lambda: latencies(params["page"], int(params["runs"])))
    return (len(out["samples_s"]), out), seconds


def web(params: dict[str, Any]) -> tuple[Any, float]:
    from bench.web import latencies

    out, seconds = _timed(lambda: latencies(int(params["runs"])))
    return (sum(len(v["cached"]) for v in out.values()), out), seconds


def freshness(params: dict[str, Any]) -> tuple[Any, float]:
    from bench.freshness import run
    from loader.clients import connect_clickhouse, connect_mongo

    s = _settings()
    mongo = connect_mongo(s)
    ch = connect_clickhouse(s)
    try:
        out, seconds = _timed(
            lambda: run(
                mongo[s.mongo_db],
                ch,
                rate=float(params["rate"]),
                seconds=float(params["seconds"]),
                probes_per_s=float(params.get("probes_per_s", 10)),
            )
        )
    finally:
        ch.close()
        mongo.close()
    extra = {
        "latencies_s": out.latencies_s,
        "kinds": out.kinds,
        "writes": out.writes,
        "write_seconds": out.seconds,
        "unseen": out.unseen,
        "deferred": out.deferred,
        "mix": dict(out.mix),
        "poll_ms_p50": round(1000 * statistics.median(out.poll_s), 1) if out.poll_s else None,
    }
    return (len(out.latencies_s), extra), seconds


JOBS: dict[str, Callable[[dict[str, Any]], tuple[Any, float]]] = {
    "loader_sync": loader_sync,
    "loader_shard": loader_shard,
    "snapshot_plan": snapshot_plan,
    "snapshot_range": snapshot_range,
    "snapshot_command": snapshot_command,
    "has_changes": has_changes,
    "dbt_build": dbt_build,
    "drain": drain,
    "seed_v1": seed_v1,
    "dlt_try_load": dlt_try_load,
    "dlt_run": dlt_run,
    "decode": decode,
    "dashboard": dashboard,
    "web": web,
    "freshness": freshness,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.worker '<json job>'", file=sys.stderr)
        return 2
    params = json.loads(argv[0])
    kind = params.get("kind")
    if kind not in JOBS:
        print(f"unknown job kind {kind!r}; choose from {', '.join(JOBS)}", file=sys.stderr)
        return 2
    (items, extra), seconds = JOBS[kind](params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {"seconds": seconds, "items": items, "peak_rss_bytes": peak, "extra": extra}
    print(MARKER + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
