"""Loader configuration, read from environment variables (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import re

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Everything the loader needs to reach its servers and how hard to push them.

    Server addresses use the project-wide env vars (`MONGO_URI`, `CLICKHOUSE_HOST`, ...); the
    loader's own knobs use a `LOADER_` prefix. Pass an instance explicitly; nothing is global.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    mongo_uri: str = Field(
        "mongodb://127.0.0.1:27017/?replicaSet=rs0", validation_alias=_env("MONGO_URI", "mongo_uri")
    )
    mongo_db: str = Field("pipeline", validation_alias=_env("MONGO_DB", "mongo_db"))
    clickhouse_host: str = Field(
        "127.0.0.1", validation_alias=_env("CLICKHOUSE_HOST", "clickhouse_host")
    )
    clickhouse_port: int = Field(8123, validation_alias=_env("CLICKHOUSE_PORT", "clickhouse_port"))
    clickhouse_user: str = Field(
        "default", validation_alias=_env("CLICKHOUSE_USER", "clickhouse_user")
    )
    clickhouse_password: SecretStr = Field(
        SecretStr(""), validation_alias=_env("CLICKHOUSE_PASSWORD", "clickhouse_password")
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL", "redis_url")
    )

    # Documents per Mongo read batch and per ClickHouse insert (see README: measured figures).
    batch_size: int = Field(10_000, ge=1, validation_alias=_env("LOADER_BATCH_SIZE", "batch_size"))
    # Late-commit window: a write may become visible up to this long after its `updated_at`.
    overlap_seconds: float = Field(
        60.0, ge=0, validation_alias=_env("LOADER_OVERLAP_SECONDS", "overlap_seconds")
    )
    # Documents dated further than this past the loader's clock are not loaded yet (they would
    # drag the watermark into the future); they are rejected once as "updated_at in the future".
    max_future_seconds: float = Field(
        86_400.0, ge=0, validation_alias=_env("LOADER_MAX_FUTURE_SECONDS", "max_future_seconds")
    )
    # Longest string value accepted in a mapped field, in characters; longer ones are rejected.
    max_string_chars: int = Field(
        65_536, ge=1, validation_alias=_env("LOADER_MAX_STRING_CHARS", "max_string_chars")
    )
    # Transient-error retries: attempts per operation and exponential backoff bounds (seconds).
    retry_attempts: int = Field(
        5, ge=1, validation_alias=_env("LOADER_RETRY_ATTEMPTS", "retry_attempts")
    )
    retry_initial_wait: float = Field(
        0.5, ge=0, validation_alias=_env("LOADER_RETRY_INITIAL_WAIT", "retry_initial_wait")
    )
    retry_max_wait: float = Field(
        10.0, ge=0, validation_alias=_env("LOADER_RETRY_MAX_WAIT", "retry_max_wait")
    )
    # How long one attempt waits for a server before counting as failed.
    connect_timeout_seconds: float = Field(
        5.0, gt=0, validation_alias=_env("LOADER_CONNECT_TIMEOUT", "connect_timeout_seconds")
    )

    def redacted_mongo_uri(self) -> str:
        """The Mongo URI without its password, safe for logs and error messages."""
        return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", self.mongo_uri)

    def clickhouse_address(self) -> str:
        return f"http://{self.clickhouse_host}:{self.clickhouse_port}"
