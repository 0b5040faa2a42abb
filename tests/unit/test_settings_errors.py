"""Every settings class (loader, flow, web, dev stack) reads the contract env vars from one
declaration (`loader.settings.ConnectionSettings`), and a bad value is an error whose `loc` is
the variable, reported by every CLI as one line naming it (`loader.errors.classify`)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from devstack.settings import StackSettings
from flows.settings import FlowSettings
from loader.errors import classify
from loader.settings import Settings
from web.settings import WebSettings

CONTRACT = {
    "MONGO_URI": "mongodb://mongo-1:27018/?replicaSet=rs9",
    "MONGO_DB": "elsewhere",
    "CLICKHOUSE_HOST": "ch-1",
    "CLICKHOUSE_PORT": "18123",
    "CLICKHOUSE_USER": "loader",
    "CLICKHOUSE_PASSWORD": "s3cret",
    "REDIS_URL": "redis://redis-1:6380/2",
}
EVERY_PACKAGE = [Settings, FlowSettings, WebSettings, StackSettings]


@pytest.mark.parametrize("settings_class", EVERY_PACKAGE)
def test_every_package_reads_the_contract_env_vars_alike(
    monkeypatch: pytest.MonkeyPatch, settings_class: type[BaseSettings]
) -> None:
    for name, value in CONTRACT.items():
        monkeypatch.setenv(name, value)

    s = settings_class()

    assert (
        s.mongo_uri,
        s.mongo_db,
        s.clickhouse_host,
        s.clickhouse_port,
        s.clickhouse_user,
        s.clickhouse_password.get_secret_value(),
        s.redis_url,
    ) == (*list(CONTRACT.values())[:3], 18123, "loader", "s3cret", CONTRACT["REDIS_URL"])


@pytest.mark.parametrize(
    ("settings_class", "name", "value"),
    [
        *[
            (Settings, name, value)
            for name, value in [
                ("CLICKHOUSE_PORT", "abc"),
                ("CLICKHOUSE_PORT", "0"),
                ("CLICKHOUSE_PORT", "65536"),
                ("MONGO_DB", "a.b"),
                ("LOADER_BATCH_SIZE", "0"),
                ("LOADER_OVERLAP_SECONDS", "-1"),
                ("LOADER_CONNECT_TIMEOUT", "inf"),
            ]
        ],
        *[
            (FlowSettings, name, value)
            for name, value in [
                ("CLICKHOUSE_PORT", "abc"),
                ("CLICKHOUSE_PORT", "0"),
                ("PIPELINE_REDIS_TIMEOUT_SECONDS", "0"),
                ("PIPELINE_PREFECT_PORT", "70000"),
                ("PIPELINE_SYNC_INTERVAL_MINUTES", "-1"),
                ("PIPELINE_SYNC_INTERVAL_MINUTES", "0"),
                ("PIPELINE_RECONCILE_INTERVAL_MINUTES", "nan"),
                ("PIPELINE_LOCK_TTL_SECONDS", "0"),
                ("PIPELINE_ALERT_CACHE_HIT_RATE", "1.5"),
                ("PIPELINE_TASK_RETRIES", "-1"),
                ("PIPELINE_TASK_RETRY_DELAY_SECONDS", "soon"),
            ]
        ],
        (WebSettings, "PIPELINE_WEB_PORT", "0"),
        (WebSettings, "CLICKHOUSE_PORT", "abc"),
        (StackSettings, "CLICKHOUSE_PORT", "abc"),
    ],
)
def test_a_bad_setting_is_an_error_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, settings_class: type[BaseSettings], name: str, value: str
) -> None:
    """`name=value` makes `settings_class()` fail with the variable as the error's only `loc`,
    and the CLIs' one line says "invalid setting <name>: ..."."""
    monkeypatch.setenv(name, value)

    with pytest.raises(ValidationError) as info:
        settings_class()

    assert [error["loc"] for error in info.value.errors()] == [(name,)]
    problem = classify(info.value)
    assert problem is not None
    assert (problem.kind, problem.variables) == ("settings", name)
    assert problem.message.startswith(f"invalid setting {name}: ")
