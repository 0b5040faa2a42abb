"""Threshold checks; a crossed threshold becomes a row in `ops.alerts`, a WARNING log line and,
when `PIPELINE_ALERT_NOTIFICATION_BLOCK` names a Prefect notification block, a notification.

Defaults come from the seed (sync over 30 s, dashboard query over 2 s, cache hit rate under 70 %,
loader memory over a limit) and are set by the `PIPELINE_ALERT_*` env vars (see settings).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from flows.cache import CacheStats
from flows.ops import ALERT_COLUMNS, insert_rows, now
from flows.settings import FlowSettings
from loader.drift import Drift


@dataclass(frozen=True)
class Alert:
    # sync_duration, query_duration, cache_hit_rate, loader_memory, source_replaced, drift,
    # unknown_value, unknown_reference, data_test_warning
    kind: str
    subject: str  # what crossed it: the run, the query, the collection
    value: float
    threshold: float
    message: str
    run_id: str = ""
    raised_at: datetime = field(default_factory=now)


def check_sync_duration(settings: FlowSettings, run_id: str, seconds: float) -> Alert | None:
    limit = settings.alert_sync_seconds
    if seconds <= limit:
        return None
    return Alert(
        "sync_duration",
        "sync_pipeline",
        seconds,
        limit,
        f"sync took {seconds:.1f} s, over the {limit:.0f} s threshold",
        run_id,
    )


def check_query_duration(settings: FlowSettings, query: str, seconds: float) -> Alert | None:
    limit = settings.alert_query_seconds
    if seconds <= limit:
        return None
    return Alert(
        "query_duration",
        query,
        seconds,
        limit,
        f"dashboard query {query} took {seconds:.2f} s, over the {limit:.1f} s threshold",
    )


def check_cache_hit_rate(
    settings: FlowSettings, run_id: str, stats: CacheStats | None
) -> Alert | None:
    if stats is None or stats.hit_rate is None or stats.lookups < settings.alert_cache_min_lookups:
        return None
    limit = settings.alert_cache_hit_rate
    if stats.hit_rate >= limit:
        return None
    return Alert(
        "cache_hit_rate",
        "dashboard_cache",
        stats.hit_rate,
        limit,
        f"cache hit rate {stats.hit_rate:.0%} over {stats.lookups} lookups, under {limit:.0%}",
        run_id,
    )


def check_loader_memory(
    settings: FlowSettings, run_id: str, collection: str, peak_rss_bytes: int
) -> Alert | None:
    limit = settings.alert_loader_rss_bytes
    if peak_rss_bytes <= limit:
        return None
    return Alert(
        "loader_memory",
        collection,
        float(peak_rss_bytes),
        float(limit),
        f"loader peak RSS {peak_rss_bytes / 2**20:.0f} MiB while syncing {collection}, "
        f"over {limit / 2**20:.0f} MiB",
        run_id,
    )


def check_source_replaced(run_id: str, collection: str, why: str) -> Alert | None:
    """A replaced source collection was reloaded from scratch (see `loader.identity`)."""
    if not why:
        return None
    return Alert("source_replaced", collection, 1.0, 0.0, why, run_id)


def check_drift(run_id: str, drift: Drift) -> Alert | None:
    """Counts that still differ after this run's reconcile: something keeps them apart."""
    if drift.in_step:
        return None
    return Alert(
        "drift",
        drift.collection,
        float(drift.differ),
        0.0,
        f"{drift.describe()}, after reconcile: run `python -m loader reconcile --verbose` and "
        "see ops.sync_runs",
        run_id,
    )


def raise_alerts(
    settings: FlowSettings,
    client: Client | None,
    alerts: Iterable[Alert | None],
    logger: logging.Logger | logging.LoggerAdapter,
) -> list[Alert]:
    """Record, log and notify every crossed threshold; return the alerts raised."""
    raised = [a for a in alerts if a is not None]
    for alert in raised:
        logger.warning("ALERT %s: %s", alert.kind, alert.message)
    if raised and client is not None:
        insert_rows(
            client,
            "ops.alerts",
            ALERT_COLUMNS,
            [
                (a.raised_at, a.run_id, a.kind, a.subject, a.value, a.threshold, a.message)
                for a in raised
            ],
        )
    if raised and settings.alert_notification_block:
        _notify(settings.alert_notification_block, raised, logger)
    return raised


def _notify(
    block_name: str, alerts: list[Alert], logger: logging.Logger | logging.LoggerAdapter
) -> None:
    from prefect.blocks.core import Block

    body = "\n".join(f"- {a.kind}: {a.message}" for a in alerts)
    try:
        block: Any = Block.load(block_name)  # sync here (sync_compatible): the block itself
        block.notify(body=body, subject=f"sync pipeline: {len(alerts)} alert(s)")
    except Exception as exc:  # a broken notifier must not fail the pipeline
        logger.warning("Could not notify through Prefect block %r: %s", block_name, exc)
