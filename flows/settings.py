"""Settings of the flow, the cache, the lock and the alerts (env vars; unset = default).

The connection settings (`MONGO_*`, `CLICKHOUSE_*`, `REDIS_URL`) are inherited from
`loader.settings.ConnectionSettings`, so one environment drives every part; the flow's own
knobs carry the `PIPELINE_` prefix.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasGenerator, Field
from pydantic_settings import SettingsConfigDict

from loader.settings import ConnectionSettings, Port

# The repository root: `dbt_project.yml` lives there and dbt runs from there.
REPO_ROOT = Path(__file__).resolve().parents[1]


class FlowSettings(ConnectionSettings):
    # Every `PIPELINE_` knob has its env var as alias, so a validation error's `loc` names the
    # variable (`PIPELINE_SYNC_INTERVAL_MINUTES`), not the field; keywords still use field names.
    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_",
        extra="ignore",
        validate_by_name=True,
        alias_generator=AliasGenerator(validation_alias=lambda name: f"PIPELINE_{name.upper()}"),
        allow_inf_nan=False,
    )

    # Collections the flow keeps in step, in load order.
    collections: tuple[str, ...] = ("tasks", "employee")
    # The dbt source declaring the raw tables (models/sources.yml).
    dbt_source: str = "mongo"
    dbt_project_dir: Path = REPO_ROOT
    # None: dbt's own lookup (the project dir, then ~/.dbt); `make setup` writes profiles.yml.
    dbt_profiles_dir: Path | None = None
    dbt_target: str | None = None
    # None: the project's `target/`; tests point this at a temp dir so runs never share it.
    dbt_target_path: Path | None = None

    # Embedded stack data (PIPELINE_DATA_DIR, shared with devstack): Prefect home, lock files.
    data_dir: Path = Path(".data")

    # Scheduling.
    sync_interval_minutes: float = Field(15.0, gt=0)
    # How often a scheduled run also reconciles (deletes, late writes, backward updates).
    reconcile_interval_minutes: float = Field(1440.0, gt=0)
    # Port of the local Prefect server started by `make serve` (UI and API).
    prefect_port: Port = 4200
    # Prefect global concurrency limit guarding overlap when Redis is unreachable.
    concurrency_limit_name: str = "sync-pipeline"

    # Redis keys and lifetimes.
    redis_prefix: str = "pipeline"
    lock_ttl_seconds: int = Field(3600, ge=1)
    cache_ttl_seconds: int = Field(3600, ge=1)

    # Alert thresholds (defaults from the seed).
    alert_sync_seconds: float = Field(30.0, ge=0)
    alert_query_seconds: float = Field(2.0, ge=0)
    alert_cache_hit_rate: float = Field(0.70, ge=0, le=1)
    # A hit rate measured on fewer lookups than this says nothing; do not alert on it.
    alert_cache_min_lookups: int = Field(20, ge=0)
    alert_loader_rss_bytes: int = Field(1024 * 1024 * 1024, ge=0)
    # Name of a Prefect notification block (e.g. "slack-webhook/ops"); empty = no notification.
    alert_notification_block: str = ""

    # Loader workers per collection: the load step runs as this many mapped tasks, each
    # loading the documents whose `_id` hashes to its shard (`loader.shards`).
    loader_shards: int = Field(1, ge=1)

    # Retries of transient failures (connection errors) per task.
    task_retries: int = Field(3, ge=0)
    task_retry_delay_seconds: float = Field(2.0, ge=0)

    def key(self, *parts: str) -> str:
        """A Redis key under this pipeline's prefix."""
        return ":".join((self.redis_prefix, *parts))
