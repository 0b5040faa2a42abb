"""The bench harness runs end to end at a tiny scale and writes every key of its report.

No timing assertions: figures at this scale mean nothing; the point is that `make bench` works
and that its JSON keeps the keys documented in `bench.report`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from testkit import run_module

TOP_LEVEL = {
    "schema",
    "generated_at",
    "command",
    "config",
    "machine",
    "dataset",
    "decoder_default",
    "measurements",
    "comparisons",
}
# The stable keys documented in `bench.report`; renaming one breaks readers of latest.json.
PAGES = ("overview", "file", "employee", "search")  # the web group's pages
MEASUREMENT_KEYS = {
    "load.loader",
    "load.cursor_drain",
    "load.seed_v1",
    "load.dlt",
    "sync.full",
    "sync.noop",
    "sync.has_changes",
    "noop.scheduled_run",
    "sync.incremental_1pct",
    "dashboard.pipeline_state",
    "dashboard.naive",
    "dashboard.cached",
    "memory.loader_small",
    "memory.loader_full",
    "memory.seed_v1_small",
    "memory.seed_v1_full",
    "dbt.full_refresh",
    "dbt.incremental_1pct",
    "decode.pymongo",
    "decode.pymongoarrow",
    *(f"web.{page}{suffix}" for page in PAGES for suffix in ("", "_uncached")),
    "freshness.50_per_s",
    "freshness.500_per_s",
    *(
        f"{kind}.{n}w{suffix}"
        for kind in ("shards", "snapshot")
        for n in (1, 2, 4)
        for suffix in ("", "_per_worker", "_rss")
    ),
    "snapshot.plan",
    "snapshot.command_processes",
    "snapshot.command_threads",
}
COMPARISON_KEYS = {
    "loader_vs_cursor_drain",
    "loader_vs_seed_v1",
    "loader_vs_dlt",
    "noop_vs_full",
    "probe_vs_full",
    "incremental_vs_full",
    "naive_vs_pipeline_state",
    "cached_vs_pipeline_state",
    "loader_rss_full_vs_small",
    "seed_v1_rss_full_vs_small",
    "seed_v1_vs_loader_rss_full",
    "dbt_incremental_vs_full",
    "pymongoarrow_vs_pymongo",
    *(f"web_{page}_uncached_vs_cached" for page in PAGES),
}
MEASUREMENT_FIELDS = {"title", "unit", "status", "runs", "median", "min", "max", "p50", "p95"}
COMPARISON_FIELDS = {"title", "subject", "baseline", "ratio", "target", "passed", "status"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "latest.json"
    env = {
        **os.environ,
        "BENCH_SCALE": "2000",
        "BENCH_REPEAT": "1",
        "BENCH_DASHBOARD_RUNS": "3",
        "BENCH_OUTPUT": str(out),
        # dbt's own timing needs two extra builds; the dashboard still builds the models once.
        "BENCH_SKIP": "dbt",
        # The incremental round waits the overlap window out; keep that short here.
        "LOADER_OVERLAP_SECONDS": "1",
    }
    run_module("bench", env=env, timeout=300)
    return json.loads(out.read_text())


def test_report_has_every_top_level_key(report: dict[str, Any]) -> None:
    assert set(report) >= TOP_LEVEL


def test_report_has_every_measurement_with_its_fields(report: dict[str, Any]) -> None:
    assert set(report["measurements"]) == MEASUREMENT_KEYS
    for key, m in report["measurements"].items():
        assert set(m) >= MEASUREMENT_FIELDS, key


def test_report_has_every_comparison_with_its_fields(report: dict[str, Any]) -> None:
    assert set(report["comparisons"]) == COMPARISON_KEYS
    for key, c in report["comparisons"].items():
        assert set(c) >= COMPARISON_FIELDS, key


def test_a_skipped_group_is_reported_unavailable_with_its_reason(report: dict[str, Any]) -> None:
    status = report["measurements"]["dbt.full_refresh"]["status"]
    assert status.startswith("unavailable:") and "not selected" in status


def test_the_loader_measurements_ran(report: dict[str, Any]) -> None:
    assert report["measurements"]["load.loader"]["status"] == "ok"
    assert len(report["measurements"]["load.loader"]["runs"]) == 1


def test_the_freshness_probes_were_seen(report: dict[str, Any]) -> None:
    for key in ("freshness.50_per_s", "freshness.500_per_s"):
        m = report["measurements"][key]
        assert m["status"] == "ok", (key, m["status"])
        assert m["runs"] and m["p99"] is not None, key
        assert m["detail"]["probes_unseen_within_30s"] == 0, key
        # Probe files cycle insert → status → reassign → delete; a short run under load may
        # not reach the later steps, so only the first two are required here.
        assert {"insert", "status"} <= set(m["detail"]["p50_ms_by_kind"]), key
