"""Alert thresholds, without servers: crossed -> an alert naming the value and threshold;
at or within the threshold -> none."""

from __future__ import annotations

from datetime import UTC, datetime

from flows.alerts import (
    check_cache_hit_rate,
    check_drift,
    check_loader_memory,
    check_query_duration,
    check_source_replaced,
    check_sync_duration,
)
from flows.cache import CacheStats
from flows.settings import FlowSettings
from loader.drift import Drift

SETTINGS = FlowSettings(
    alert_sync_seconds=30,
    alert_query_seconds=2,
    alert_cache_hit_rate=0.7,
    alert_cache_min_lookups=20,
    alert_loader_rss_bytes=100 * 2**20,
)

CHECKED_AT = datetime(2026, 1, 1, 12, tzinfo=UTC)


def drift(mongo: int, warehouse: int) -> Drift:
    return Drift(
        collection="tasks",
        mongo_count=mongo,
        clickhouse_count=warehouse,
        counted_before=CHECKED_AT,
        checked_at=CHECKED_AT,
    )


def test_sync_over_the_threshold_alerts() -> None:
    alert = check_sync_duration(SETTINGS, "run-1", 31.0)
    assert alert is not None
    assert (alert.kind, alert.value, alert.threshold, alert.run_id) == (
        "sync_duration",
        31.0,
        30,
        "run-1",
    )


def test_sync_within_the_threshold_does_not_alert() -> None:
    assert check_sync_duration(SETTINGS, "run-1", 29.9) is None


def test_slow_dashboard_query_alerts_naming_the_query() -> None:
    alert = check_query_duration(SETTINGS, "employee_workload", 2.5)
    assert alert is not None
    assert alert.subject == "employee_workload"


def test_low_cache_hit_rate_alerts() -> None:
    alert = check_cache_hit_rate(SETTINGS, "run-1", CacheStats(hits=10, misses=20))
    assert alert is not None
    assert round(alert.value, 3) == 0.333


def test_hit_rate_over_too_few_lookups_does_not_alert() -> None:
    assert check_cache_hit_rate(SETTINGS, "run-1", CacheStats(hits=0, misses=5)) is None


def test_loader_memory_over_the_limit_alerts_naming_the_collection() -> None:
    alert = check_loader_memory(SETTINGS, "run-1", "tasks", 200 * 2**20)
    assert alert is not None
    assert alert.subject == "tasks"


def test_sync_exactly_at_the_threshold_does_not_alert() -> None:
    assert check_sync_duration(SETTINGS, "run-1", 30.0) is None


def test_dashboard_query_exactly_at_the_threshold_does_not_alert() -> None:
    assert check_query_duration(SETTINGS, "employee_workload", 2.0) is None


def test_cache_hit_rate_exactly_at_the_threshold_does_not_alert() -> None:
    assert check_cache_hit_rate(SETTINGS, "run-1", CacheStats(hits=14, misses=6)) is None


def test_cache_hit_rate_just_under_the_threshold_alerts() -> None:
    assert check_cache_hit_rate(SETTINGS, "run-1", CacheStats(hits=13, misses=7)) is not None


def test_hit_rate_over_exactly_the_minimum_of_lookups_counts() -> None:
    assert check_cache_hit_rate(SETTINGS, "run-1", CacheStats(hits=0, misses=20)) is not None


def test_loader_memory_exactly_at_the_limit_does_not_alert() -> None:
    assert check_loader_memory(SETTINGS, "run-1", "tasks", 100 * 2**20) is None


def test_a_replaced_source_alerts_naming_the_collection_and_why() -> None:
    alert = check_source_replaced("run-1", "tasks", "its collection UUID changed")

    assert alert is not None
    assert (alert.kind, alert.subject, alert.message) == (
        "source_replaced",
        "tasks",
        "its collection UUID changed",
    )


def test_a_source_that_was_not_replaced_does_not_alert() -> None:
    assert check_source_replaced("run-1", "tasks", "") is None


def test_counts_that_still_differ_alert_with_the_number_of_documents() -> None:
    alert = check_drift("run-1", drift(mongo=1_005, warehouse=1_000))

    assert alert is not None
    assert (alert.kind, alert.subject, alert.value, alert.threshold) == ("drift", "tasks", 5.0, 0)


def test_a_warehouse_with_more_documents_than_mongodb_alerts_too() -> None:
    alert = check_drift("run-1", drift(mongo=1_000, warehouse=1_002))

    assert alert is not None and alert.value == 2.0


def test_equal_counts_do_not_alert() -> None:
    assert check_drift("run-1", drift(mongo=1_000, warehouse=1_000)) is None
