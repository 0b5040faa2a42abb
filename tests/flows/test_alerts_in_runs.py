"""Alerts raised by real flow runs: every threshold a run crosses becomes a row in `ops.alerts`
and one notification through the configured Prefect block; a notifier that fails does not fail
the run; a value exactly at its threshold does not alert."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from flows.pipeline import sync_pipeline

if TYPE_CHECKING:  # fixtures' types, from this suite's conftest.py
    from conftest import Pipeline
    from testkit import Captured

pytestmark = pytest.mark.timeout(900)


class Webhook:
    """A local HTTP endpoint that records what it receives and answers `status`."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length", 0))
                hook.bodies.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def notify_through(webhook: Webhook, monkeypatch: pytest.MonkeyPatch) -> None:
    """Save a Prefect notification block posting to `webhook` and name it in the settings."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    name = f"alerts-{uuid.uuid4().hex[:8]}"
    CustomWebhookNotificationBlock(
        name="alerts",
        url=webhook.url,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        allow_private_urls=True,
    ).save(name)
    monkeypatch.setenv("PIPELINE_ALERT_NOTIFICATION_BLOCK", f"custom-webhook/{name}")


@pytest.fixture
def webhook_ok() -> Iterator[Webhook]:
    hook = Webhook(200)
    yield hook
    hook.close()


@pytest.fixture
def webhook_down() -> Iterator[Webhook]:
    hook = Webhook(500)
    yield hook
    hook.close()


def record_cache_lookups(pipeline: Pipeline, hits: int, misses: int) -> None:
    """Dashboard lookups through the real cache: `misses` distinct queries, then `hits`
    repeats of one of them."""
    from flows.cache import QueryCache
    from flows.redis_link import RedisLink

    link = RedisLink(pipeline.settings, logging.getLogger("test"))
    cache = QueryCache(pipeline.settings, link)
    try:
        for n in range(misses):
            assert not cache.get_or_compute(f"panel-{n}", lambda: [{"n": 1}]).hit
        for _ in range(hits):
            assert cache.get_or_compute("panel-0", lambda: [{"n": 1}]).hit
    finally:
        link.close()


def alerts_of(pipeline: Pipeline, run_id: str) -> list[tuple[str, str, float]]:
    rows = pipeline.rows(
        "SELECT kind, subject, threshold FROM ops.alerts WHERE run_id = {r:String} "
        "ORDER BY kind, subject",
        r=run_id,
    )
    return [(r["kind"], r["subject"], r["threshold"]) for r in rows]


def test_every_threshold_a_run_crosses_is_recorded_and_notified_once(
    pipeline: Pipeline, webhook_ok: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_ALERT_SYNC_SECONDS", "0")
    monkeypatch.setenv("PIPELINE_ALERT_LOADER_RSS_BYTES", "1")
    record_cache_lookups(pipeline, hits=0, misses=20)
    notify_through(webhook_ok, monkeypatch)

    summary = sync_pipeline()

    assert summary["status"] == "ok"
    assert alerts_of(pipeline, summary["run_id"]) == [
        ("cache_hit_rate", "dashboard_cache", 0.7),
        ("loader_memory", "employee", 1.0),
        ("loader_memory", "tasks", 1.0),
        ("sync_duration", "sync_pipeline", 0.0),
    ]
    assert len(webhook_ok.bodies) == 1
    body = webhook_ok.bodies[0]["body"]
    assert "4 alert(s)" in webhook_ok.bodies[0]["subject"]
    for kind in ("cache_hit_rate", "loader_memory", "sync_duration"):
        assert f"- {kind}: " in body


def test_a_failing_notifier_does_not_fail_the_run(
    pipeline: Pipeline,
    webhook_down: Webhook,
    run_logs: Captured,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPELINE_ALERT_SYNC_SECONDS", "0")
    notify_through(webhook_down, monkeypatch)

    summary = sync_pipeline()

    assert summary["status"] == "ok"
    assert len(webhook_down.bodies) == 1  # it was asked, and answered 500
    assert alerts_of(pipeline, summary["run_id"]) == [("sync_duration", "sync_pipeline", 0.0)]
    warnings = run_logs.messages(logging.WARNING)
    assert any(m.startswith("Could not notify through Prefect block") for m in warnings)


def test_a_cache_hit_rate_exactly_at_its_threshold_does_not_alert(pipeline: Pipeline) -> None:
    # 14 hits in 20 lookups: 70 %, the threshold, over exactly the minimum of lookups.
    record_cache_lookups(pipeline, hits=14, misses=6)

    summary = sync_pipeline()

    assert summary["status"] == "ok"
    assert [a for a in alerts_of(pipeline, summary["run_id"]) if a[0] == "cache_hit_rate"] == []
