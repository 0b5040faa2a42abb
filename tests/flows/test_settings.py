"""Flow settings: a bad numeric env var is an error whose `loc` is the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.settings import FlowSettings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLICKHOUSE_PORT", "abc"),
        ("CLICKHOUSE_PORT", "0"),
        ("PIPELINE_PREFECT_PORT", "70000"),
        ("PIPELINE_SYNC_INTERVAL_MINUTES", "-1"),
        ("PIPELINE_SYNC_INTERVAL_MINUTES", "0"),
        ("PIPELINE_RECONCILE_INTERVAL_MINUTES", "nan"),
        ("PIPELINE_LOCK_TTL_SECONDS", "0"),
        ("PIPELINE_ALERT_CACHE_HIT_RATE", "1.5"),
        ("PIPELINE_TASK_RETRIES", "-1"),
        ("PIPELINE_TASK_RETRY_DELAY_SECONDS", "soon"),
    ],
)
def test_a_bad_numeric_env_var_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ValidationError) as info:
        FlowSettings()

    assert [error["loc"] for error in info.value.errors()] == [(name,)]


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
