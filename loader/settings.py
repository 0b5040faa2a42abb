"""Loader configuration, read from environment variables (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict


def _port_number(value: Any) -> int:
    """A TCP port, 1..65535, from an int or a string of ASCII digits (nothing else: no '8123.0',
    no 'abc' silently becoming 0)."""
    ok_type = isinstance(value, int | str) and not isinstance(value, bool)
    text = str(value).strip() if ok_type else ""
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise PydanticCustomError(
        "port_number",
        "should be a port number from 1 to 65535, got {value}",
        {"value": repr(value)},
    )


# A port read from an env var: a validation error's `loc` is the variable (the field's alias).
Port = Annotated[int, BeforeValidator(_port_number)]


class ConnectionSettings(BaseSettings):
    """Where the servers are and how patiently to reach them: the one declaration of the
    contract env vars (`MONGO_URI`, `MONGO_DB`, `CLICKHOUSE_*`, `REDIS_URL`).

    Every package's settings inherit this class (`Settings` here, `flows.settings.FlowSettings`,
    `web.settings.WebSettings`, `devstack.settings.StackSettings`), and every client is built
    from it by `loader.clients` (`connect_clickhouse`, `connect_mongo`, `connect_redis`). A new
    connection env var is a field here. With `populate_by_name`, a field's own name also works,
    as a keyword and as an env var.
    """

    # allow_inf_nan=False: "inf" or "nan" in a float knob is an error naming the variable.
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)

    mongo_uri: str = Field(
        "mongodb://127.0.0.1:27017/?replicaSet=rs0", validation_alias="MONGO_URI"
    )
    mongo_db: str = Field("pipeline", validation_alias="MONGO_DB")
    clickhouse_host: str = Field("127.0.0.1", validation_alias="CLICKHOUSE_HOST")
    clickhouse_port: Port = Field(8123, validation_alias="CLICKHOUSE_PORT")
    clickhouse_user: str = Field("default", validation_alias="CLICKHOUSE_USER")
    clickhouse_password: SecretStr = Field(SecretStr(""), validation_alias="CLICKHOUSE_PASSWORD")
    # A cluster name from the servers' remote_servers: every DDL goes ON CLUSTER with Replicated
    # and Distributed tables (loader.schema); empty = one server. It is spliced into SQL: a name.
    clickhouse_cluster: str = Field(
        "", pattern=r"^[A-Za-z0-9_]*$", validation_alias="CLICKHOUSE_CLUSTER"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    # Redis is optional to every part (cache, lock, signals): a call that waits longer than
    # this counts as Redis being down, and the caller goes on without it.
    redis_timeout_seconds: float = Field(
        1.0, gt=0, validation_alias="PIPELINE_REDIS_TIMEOUT_SECONDS"
    )

    # Transient-error retries: attempts per operation and exponential backoff bounds (seconds).
    retry_attempts: int = Field(5, ge=1, validation_alias="LOADER_RETRY_ATTEMPTS")
    retry_initial_wait: float = Field(0.5, ge=0, validation_alias="LOADER_RETRY_INITIAL_WAIT")
    retry_max_wait: float = Field(10.0, ge=0, validation_alias="LOADER_RETRY_MAX_WAIT")
    # How long one attempt waits for a server before counting as failed.
    connect_timeout_seconds: float = Field(5.0, gt=0, validation_alias="LOADER_CONNECT_TIMEOUT")
    # The first connection to each server gives up after this long in all, retries included,
    # so a server that is down or a wrong address is reported quickly (see loader.clients).
    connect_deadline_seconds: float = Field(5.0, gt=0, validation_alias="LOADER_CONNECT_DEADLINE")

    @field_validator("mongo_db")
    @classmethod
    def _mongo_database_name(cls, name: str) -> str:
        # MongoDB's own rules; checked here so the error names the variable and the fix.
        forbidden = sorted(set(name) & set('/\\. "$\x00'))
        if not name or forbidden or len(name.encode()) > 63:
            raise ValueError(
                f"MONGO_DB={name!r} is not a MongoDB database name: use 1 to 63 bytes without "
                '/ \\ . space " $ or NUL (for example MONGO_DB=pipeline)'
            )
        return name

    def redacted_mongo_uri(self) -> str:
        """The Mongo URI without its password, safe for logs and error messages."""
        return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", self.mongo_uri)

    def clickhouse_address(self) -> str:
        return f"http://{self.clickhouse_host}:{self.clickhouse_port}"


class Settings(ConnectionSettings):
    """The loader's own knobs (`LOADER_` prefix) on top of the connection settings. Pass an
    instance explicitly; nothing is global."""

    model_config = SettingsConfigDict(frozen=True)

    # Documents per Mongo read batch and per ClickHouse insert (see README: measured figures).
    batch_size: int = Field(10_000, ge=1, validation_alias="LOADER_BATCH_SIZE")
    # How a batch is decoded: "pymongoarrow" straight into Arrow columns (the faster, see
    # `make bench`), "pymongo" into a dict per document. Both load the same rows.
    decoder: Literal["pymongoarrow", "pymongo"] = Field(
        "pymongoarrow", validation_alias="LOADER_DECODER"
    )
    # Where the snapshot (the batch reads of `sync`) reads from; change streams and reconcile
    # always read the primary. A secondary lags by its replication delay (docs/scaling/).
    read_preference: Literal[
        "primary", "primaryPreferred", "secondary", "secondaryPreferred", "nearest"
    ] = Field("primary", validation_alias="LOADER_READ_PREFERENCE")
    # The change-stream follower stores what it has buffered at least this often (and at
    # `flush_every` events), so a write reaches raw and pipeline_state within about this long.
    flush_interval_ms: int = Field(
        100, ge=1, le=60_000, validation_alias="LOADER_FLUSH_INTERVAL_MS"
    )
    # Late-commit window: a write may become visible up to this long after its `updated_at`.
    overlap_seconds: float = Field(60.0, ge=0, validation_alias="LOADER_OVERLAP_SECONDS")
    # Documents dated further than this past the loader's clock are not loaded yet (they would
    # drag the watermark into the future); they are rejected once as "updated_at in the future".
    max_future_seconds: float = Field(86_400.0, ge=0, validation_alias="LOADER_MAX_FUTURE_SECONDS")
    # Longest string value accepted in a mapped field, in characters; longer ones are rejected.
    max_string_chars: int = Field(65_536, ge=1, validation_alias="LOADER_MAX_STRING_CHARS")
