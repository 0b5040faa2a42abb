"""Flow settings: the `PIPELINE_` knobs come from their own variables (bad values: see
tests/unit/test_settings_errors.py)."""

from __future__ import annotations

import pytest

from flows.settings import FlowSettings


def test_knobs_come_from_pipeline_vars_and_keywords_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_DATA_DIR", raising=False)  # the session stack sets it
    monkeypatch.delenv("PIPELINE_LOCK_TTL_SECONDS", raising=False)
    monkeypatch.setenv("PIPELINE_SYNC_INTERVAL_MINUTES", "5")
    monkeypatch.setenv("LOCK_TTL_SECONDS", "0")  # no prefix: not ours, ignored
    monkeypatch.setenv("DATA_DIR", "/not/ours")

    settings = FlowSettings(redis_prefix="kw")

    assert settings.sync_interval_minutes == 5
    assert (settings.lock_ttl_seconds, str(settings.data_dir)) == (3600, ".data")
    assert settings.redis_prefix == "kw"
