"""What the environment says about the stack: the data dir, and which parts are external.

A contract env var (`MONGO_URI`, `CLICKHOUSE_HOST`, `REDIS_URL`) that is set means "use that
server": `up` and `down` leave that part alone. One exception keeps the variables usable with the
embedded stack itself: a variable that points exactly at the embedded server's own address
(127.0.0.1 or localhost, on the port `up` would use) still counts as embedded.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo.uri_parser import parse_uri

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        Path(".data"), validation_alias=AliasChoices("PIPELINE_DATA_DIR", "data_dir")
    )
    mongo_uri: str | None = Field(None, validation_alias="MONGO_URI")
    clickhouse_host: str | None = Field(None, validation_alias="CLICKHOUSE_HOST")
    clickhouse_port: int | None = Field(None, validation_alias="CLICKHOUSE_PORT")
    clickhouse_user: str = Field("default", validation_alias="CLICKHOUSE_USER")
    clickhouse_password: str | None = Field(None, validation_alias="CLICKHOUSE_PASSWORD")
    redis_url: str | None = Field(None, validation_alias="REDIS_URL")

    def external(self, ports: dict[str, int]) -> dict[str, str]:
        """Parts served from elsewhere: service name -> the env var (and value) that says so."""
        out: dict[str, str] = {}
        if self.mongo_uri and not _mongo_is_local(self.mongo_uri, ports["mongo"]):
            out["mongo"] = f"MONGO_URI={_redact(self.mongo_uri)}"
        if self.clickhouse_host and not (
            self.clickhouse_host in LOCAL_HOSTS
            and (self.clickhouse_port or 8123) == ports["clickhouse"]
        ):
            out["clickhouse"] = f"CLICKHOUSE_HOST={self.clickhouse_host}" + (
                f", CLICKHOUSE_PORT={self.clickhouse_port}" if self.clickhouse_port else ""
            )
        if self.redis_url and not _url_is_local(self.redis_url, ports["redis"]):
            out["redis"] = f"REDIS_URL={_redact(self.redis_url)}"
        return out


def _mongo_is_local(uri: str, port: int) -> bool:
    try:
        nodes = parse_uri(uri)["nodelist"]
    except Exception:  # malformed, or an SRV record that does not resolve: not ours
        return False
    return len(nodes) == 1 and nodes[0][0] in LOCAL_HOSTS and nodes[0][1] == port


def _url_is_local(url: str, port: int) -> bool:
    parts = urlsplit(url)
    return parts.hostname in LOCAL_HOSTS and (parts.port or 6379) == port


def _redact(url: str) -> str:
    """Hide a password in a URL before printing it."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    return url
