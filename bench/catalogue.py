"""Every measurement and ratio the bench reports, with its target (see `bench.report`)."""

from __future__ import annotations

from bench.report import Comparison, Measurement

WEB_PAGES = (
    ("overview", "/"),
    ("file", "/files/<id>"),
    ("employee", "/employees/<code>"),
    ("search", "/search"),
)
# Loader shard workers the `shards` group runs side by side (issue 15).
SHARD_WORKERS = (1, 2, 4)
# How the one `snapshot --workers N` command runs its ranges (`--threads` or not).
SNAPSHOT_MODES = ("processes", "threads")
# The target for every page, cached, at 1M tasks.
WEB_P95_TARGET_MS = 50.0


def new_measurements(scale: int, small: int) -> dict[str, Measurement]:
    def m(key: str, title: str, unit: str, higher: bool, latency: bool = False) -> Measurement:
        return Measurement(key, title, unit, higher_is_better=higher, latency=latency)

    items = [
        m("load.loader", "initial load: our loader", "docs/s", True),
        m("load.cursor_drain", "initial load: raw cursor drain (ceiling)", "docs/s", True),
        m("load.seed_v1", "initial load: seed's first version", "docs/s", True),
        m("load.dlt", "initial load: dlt (MongoDB source)", "docs/s", True),
        m("sync.full", f"loader full load, {scale:,} tasks", "s", False),
        m("sync.noop", "loader sync, nothing changed", "s", False),
        m("sync.has_changes", "has_changes probe, nothing changed", "s", False),
        m("noop.scheduled_run", "scheduled flow run, nothing changed (wall)", "s", False),
        m("sync.incremental_1pct", "loader sync after 1% of tasks changed", "s", False),
        m("dashboard.pipeline_state", "dashboard: pipeline_state + marts", "ms", False, True),
        m("dashboard.naive", "dashboard: naive argMax over all events", "ms", False, True),
        m("dashboard.cached", "dashboard: through the Redis cache", "ms", False, True),
        *(
            m(f"web.{page}{suffix}", f"web page {title}: server time, {mode}", "ms", False, True)
            for page, title in WEB_PAGES
            for suffix, mode in (("", "cached"), ("_uncached", "uncached"))
        ),
        m("memory.loader_small", f"loader peak RSS, {small:,} tasks", "MiB", False),
        m("memory.loader_full", f"loader peak RSS, {scale:,} tasks", "MiB", False),
        m("memory.seed_v1_small", f"seed v1 peak RSS, {small:,} tasks", "MiB", False),
        m("memory.seed_v1_full", f"seed v1 peak RSS, {scale:,} tasks", "MiB", False),
        m("dbt.full_refresh", "the flow's dbt build --full-refresh, every source", "s", False),
        m("dbt.incremental_1pct", "the flow's dbt build after 1% of tasks changed", "s", False),
        m("decode.pymongo", "batch conversion: pymongo (dicts)", "docs/s", True),
        m("decode.pymongoarrow", "batch conversion: pymongoarrow", "docs/s", True),
        m("freshness.50_per_s", "write → pipeline_state, 50 writes/s", "ms", False, True),
        m("freshness.500_per_s", "write → pipeline_state, 500 writes/s", "ms", False, True),
        *(
            m(f"{kind}.{n}w{suffix}", f"initial {load}, {n} {workers} at once: {what}", u, h)
            for kind, load, workers in (
                ("shards", "load", "shard worker(s)"),
                ("snapshot", "snapshot", "_id range(s)"),
            )
            for n in SHARD_WORKERS
            for suffix, what, u, h in (
                ("", "all workers", "docs/s", True),
                ("_per_worker", "per worker", "docs/s", True),
                ("_rss", "peak RSS per worker", "MiB", False),
            )
        ),
        m(
            "snapshot.plan",
            f"snapshot plan ({SHARD_WORKERS[-1]} ranges): resume point + $sample",
            "s",
            False,
        ),
        *(
            m(
                f"snapshot.command_{mode}",
                f"`snapshot --workers {SHARD_WORKERS[-1]}` in {mode}, plan and start-up included",
                "docs/s",
                True,
            )
            for mode in SNAPSHOT_MODES
        ),
    ]
    return {x.key: x for x in items}


def new_comparisons() -> dict[str, Comparison]:
    items = [
        Comparison(
            "loader_vs_cursor_drain",
            "loader ÷ drain",
            "load.loader",
            "load.cursor_drain",
            row="load.cursor_drain",
            op=">=",
            threshold=0.7,
        ),
        Comparison(
            "loader_vs_seed_v1",
            "loader ÷ seed v1",
            "load.loader",
            "load.seed_v1",
            row="load.seed_v1",
            op=">=",
            threshold=10,
        ),
        Comparison(
            "loader_vs_dlt",
            "loader ÷ dlt",
            "load.loader",
            "load.dlt",
            row="load.dlt",
            op=">=",
            threshold=3,
        ),
        Comparison(
            "noop_vs_full",
            "no-op ÷ full load",
            "sync.noop",
            "sync.full",
            row="sync.noop",
            op="<=",
            threshold=0.01,
        ),
        Comparison(
            "probe_vs_full",
            "has_changes ÷ full load (the flow's skip)",
            "sync.has_changes",
            "sync.full",
            row="sync.has_changes",
        ),
        Comparison(
            "incremental_vs_full",
            "1% incremental ÷ full load",
            "sync.incremental_1pct",
            "sync.full",
            row="sync.incremental_1pct",
            op="<=",
            threshold=0.05,
        ),
        Comparison(
            "naive_vs_pipeline_state",
            "naive ÷ pipeline_state (speed-up)",
            "dashboard.naive",
            "dashboard.pipeline_state",
            row="dashboard.naive",
            op=">=",
            threshold=20,
            note="target defined at 1M tasks",
        ),
        Comparison(
            "cached_vs_pipeline_state",
            "cached ÷ pipeline_state",
            "dashboard.cached",
            "dashboard.pipeline_state",
            row="dashboard.cached",
        ),
        *(
            Comparison(
                f"web_{page}_uncached_vs_cached",
                "uncached ÷ cached",
                f"web.{page}_uncached",
                f"web.{page}",
                row=f"web.{page}_uncached",
            )
            for page, _ in WEB_PAGES
        ),
        Comparison(
            "loader_rss_full_vs_small",
            "full ÷ small",
            "memory.loader_full",
            "memory.loader_small",
            row="memory.loader_full",
            op="<=",
            threshold=1.3,
            note="target defined as 1M vs 100k tasks",
        ),
        Comparison(
            "seed_v1_rss_full_vs_small",
            "full ÷ small",
            "memory.seed_v1_full",
            "memory.seed_v1_small",
            row="memory.seed_v1_full",
        ),
        Comparison(
            "seed_v1_vs_loader_rss_full",
            "seed v1 ÷ loader at full scale",
            "memory.seed_v1_full",
            "memory.loader_full",
            row="memory.seed_v1_full",
        ),
        Comparison(
            "dbt_incremental_vs_full",
            "incremental ÷ full refresh",
            "dbt.incremental_1pct",
            "dbt.full_refresh",
            row="dbt.incremental_1pct",
            op="<=",
            threshold=0.3,
        ),
        Comparison(
            "pymongoarrow_vs_pymongo",
            "pymongoarrow ÷ pymongo",
            "decode.pymongoarrow",
            "decode.pymongo",
            row="decode.pymongoarrow",
        ),
    ]
    return {c.key: c for c in items}


MEASUREMENT_KEYS: tuple[str, ...] = tuple(new_measurements(1, 1))
COMPARISON_KEYS: tuple[str, ...] = tuple(new_comparisons())
