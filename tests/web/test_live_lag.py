"""The banner says how far behind MongoDB the live updates (the change-stream follower) are.

States, read from `ops.change_stream_state` on the real warehouse: running and in step ("live",
"live: N s behind"), behind beyond `PIPELINE_WEB_LAG_WARN_SECONDS` (a warning naming the lag),
and not running or never run (neutral words, never an alarm: `make demo` runs no follower). An
idle follower re-saves its position now and then, so "saved long ago" means stopped, not idle.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import expect

from flows.live_lag import OFF_TEXT, SILENT_AFTER_S, LiveLevel

if TYPE_CHECKING:
    from conftest import Site

pytestmark = pytest.mark.timeout(900)


def saved_state(site: Site, *, lag_seconds: float, saved_ago_s: float) -> None:
    """The follower's last save, as `loader.store.save_resume_token` writes it, `saved_ago_s`
    seconds ago by ClickHouse's clock; nothing else in the table."""
    site.ch.command("TRUNCATE TABLE ops.change_stream_state")
    site.ch.command(
        "INSERT INTO ops.change_stream_state "
        "(collection, resume_token, events, saved_at, lag_seconds, last_event_at) "
        "SELECT 'tasks', '{\"_data\": \"00\"}', 1, "
        "now64(6) - toIntervalMillisecond({ago:UInt64}), {lag:Float64}, now64(3)",
        parameters={"ago": int(saved_ago_s * 1000), "lag": lag_seconds},
    )


def live_state(site: Site) -> Any:
    from flows.redis_link import RedisLink
    from web import views
    from web.data import Reader, ReadStats

    link = RedisLink(site.settings, logging.getLogger("test"))
    try:
        reader = Reader(site.settings, link, site.ch)
        return views.trust(reader, site.settings, ReadStats(), views.now_ms())
    finally:
        link.close()


def test_no_follower_state_reads_as_live_updates_off_without_an_alarm(site: Site) -> None:
    site.ch.command("TRUNCATE TABLE ops.change_stream_state")
    banner = live_state(site)
    assert banner.live.level == LiveLevel.off and banner.live.text == OFF_TEXT
    assert banner.level == "ok", banner


def test_a_follower_silent_for_long_reads_as_off_even_when_it_was_behind(site: Site) -> None:
    saved_state(site, lag_seconds=120, saved_ago_s=SILENT_AFTER_S + 60)
    banner = live_state(site)
    assert banner.live.level == LiveLevel.off and banner.level == "ok"


def test_a_running_follower_in_step_reads_as_live(site: Site) -> None:
    saved_state(site, lag_seconds=0.2, saved_ago_s=1)
    assert live_state(site).live.text == "live"
    saved_state(site, lag_seconds=3.4, saved_ago_s=1)
    banner = live_state(site)
    assert banner.live.level == LiveLevel.live and banner.live.text == "live: 3 s behind"
    assert banner.level == "ok"


def test_a_follower_behind_the_threshold_is_a_warning_naming_the_lag(site: Site) -> None:
    assert site.settings.web_lag_warn_seconds == 10
    saved_state(site, lag_seconds=42, saved_ago_s=1)
    banner = live_state(site)
    assert banner.live.level == LiveLevel.behind and "42 s behind" in banner.live.text
    assert banner.level == "warn"


def test_an_idle_follower_keeps_saying_it_runs(site: Site) -> None:
    """No writes at all: the follower stores nothing, yet re-saves its position."""
    from loader.follower import follow_changes

    site.ch.command("TRUNCATE TABLE ops.change_stream_state")
    follow_changes(site.pipeline.loader_settings, "tasks", all_changes=True, max_events=0)
    saved_state_age = "SELECT max(saved_at) FROM ops.change_stream_state WHERE collection = 'tasks'"
    first = site.scalar(saved_state_age)

    result = follow_changes(
        site.pipeline.loader_settings,
        "tasks",
        all_changes=True,
        idle_timeout_s=1.5,
        alive_every_s=0.3,
    )

    assert result.events == 0 and result.batches == 0
    assert site.scalar(saved_state_age) > first, "the idle follower saved nothing"
    assert live_state(site).live.text == "live"


def test_the_banner_warns_when_live_updates_fall_behind(page: Any, site: Site) -> None:
    from test_pages import screenshots

    saved_state(site, lag_seconds=42, saved_ago_s=1)
    page.goto(site.url + "/")
    lag = page.locator("#live-lag")
    expect(lag).to_have_attribute("data-level", "behind")
    expect(lag).to_contain_text("42 s behind MongoDB")
    expect(page.locator("#trust")).to_have_class("banner banner-warn")
    page.locator("#trust").screenshot(path=str(screenshots() / "banner-behind.png"))

    saved_state(site, lag_seconds=0, saved_ago_s=SILENT_AFTER_S + 60)
    page.goto(site.url + "/")
    expect(lag).to_have_attribute("data-level", "off")
    expect(lag).to_have_text(OFF_TEXT)


def test_make_dashboard_prints_the_same_state_first(site: Site) -> None:
    from flows.dashboard import live_panel

    saved_state(site, lag_seconds=42, saved_ago_s=1)
    panel = live_panel(site.ch, site.settings.web_lag_warn_seconds)
    assert panel.rows[0]["state"] == live_state(site).live.text
    assert [r["collection"] for r in panel.rows] == ["(all)", "tasks"]
    assert panel.rows[1]["lag_s"] == 42
