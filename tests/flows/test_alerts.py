"""Alert thresholds: crossed -> an alert naming the value and threshold; otherwise none."""

from __future__ import annotations

from flows.alerts import (
    check_cache_hit_rate,
    check_loader_memory,
    check_query_duration,
    check_sync_duration,
)
from flows.cache import CacheStats
from flows.settings import FlowSettings

SETTINGS = FlowSettings(
    alert_sync_seconds=30,
    alert_query_seconds=2,
    alert_cache_hit_rate=0.7,
    alert_cache_min_lookups=20,
    alert_loader_rss_bytes=100 * 2**20,
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
