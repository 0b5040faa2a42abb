"""What the environment says about the stack: the data dir, and which parts are external.

A contract env var (`MONGO_URI`, `CLICKHOUSE_HOST`, `REDIS_URL`) that is set means "use that
server": `up` and `down` leave that part alone. A variable that points at this machine
(127.0.0.1 or localhost) names the embedded server's port instead, so the exported variables that
`up` prints drive `up`, `down`, the loader and dbt alike; if some other program already listens
there, the CLI leaves it alone as an external server.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pymongo.errors import InvalidURI
from pymongo.uri_parser import parse_uri

from loader.settings import ConnectionSettings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class StackSettings(ConnectionSettings):
    """The connection settings (`loader.settings.ConnectionSettings`, declared there once) and
    which of them the environment sets: only a set variable names a server (`configured`)."""

    data_dir: Path = Field(
        Path(".data"), validation_alias=AliasChoices("PIPELINE_DATA_DIR", "data_dir")
    )

    def given(self, name: str) -> bool:
        """Whether the environment (or a keyword) set this field to something; unset or empty
        means the embedded default."""
        return name in self.model_fields_set and getattr(self, name) != ""

    @field_validator("mongo_uri")
    @classmethod
    def _mongo_uri_port(cls, uri: str) -> str:
        # A typo in the port of a plain mongodb:// URI must not turn into "external, not managed
        # here"; an SRV record that does not resolve (offline) is left to the loader.
        if uri and uri.startswith("mongodb://"):
            try:
                parse_uri(uri)
            except (InvalidURI, ValueError) as exc:  # pymongo raises ValueError for a bad port
                raise ValueError(f"not a MongoDB connection string: {exc}") from None
        return uri

    @field_validator("redis_url")
    @classmethod
    def _redis_url_port(cls, url: str) -> str:
        if url:
            try:
                port = urlsplit(url).port
            except ValueError as exc:  # "abc", or out of 0..65535
                raise ValueError(f"its port is not a port number from 1 to 65535 ({exc})") from None
            if port == 0:
                raise ValueError("its port is not a port number from 1 to 65535 (0)")
        return url

    def local_ports(self) -> dict[str, int]:
        """Ports of the parts whose env var points at this machine (127.0.0.1 / localhost)."""
        out: dict[str, int] = {}
        if self.given("mongo_uri") and (port := _mongo_local_port(self.mongo_uri)) is not None:
            out["mongo"] = port
        if self.given("clickhouse_host") and self.clickhouse_host in LOCAL_HOSTS:
            out["clickhouse"] = self.clickhouse_port
        if self.given("redis_url") and (port := _url_local_port(self.redis_url)) is not None:
            out["redis"] = port
        return out

    def configured(self) -> dict[str, str]:
        """Parts named by an env var: service name -> the variable (password hidden)."""
        out: dict[str, str] = {}
        if self.given("mongo_uri"):
            out["mongo"] = f"MONGO_URI={_redact(self.mongo_uri)}"
        if self.given("clickhouse_host"):
            out["clickhouse"] = f"CLICKHOUSE_HOST={self.clickhouse_host}" + (
                f", CLICKHOUSE_PORT={self.clickhouse_port}" if self.given("clickhouse_port") else ""
            )
        if self.given("redis_url"):
            out["redis"] = f"REDIS_URL={_redact(self.redis_url)}"
        return out

    def external(self, ports: dict[str, int]) -> dict[str, str]:
        """Parts served from elsewhere: named by an env var that does not point at the embedded
        server's address (this machine, on the port in `ports`)."""
        local = self.local_ports()
        return {
            name: why for name, why in self.configured().items() if local.get(name) != ports[name]
        }


def _mongo_local_port(uri: str) -> int | None:
    try:
        nodes = parse_uri(uri)["nodelist"]
    except Exception:  # malformed, or an SRV record that does not resolve: not ours
        return None
    if len(nodes) == 1 and nodes[0][0] in LOCAL_HOSTS:
        return int(nodes[0][1])
    return None


def _url_local_port(url: str) -> int | None:
    parts = urlsplit(url)
    if parts.hostname in LOCAL_HOSTS:
        return parts.port or 6379
    return None


def _redact(url: str) -> str:
    """Hide a password in a URL before printing it."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    return url
