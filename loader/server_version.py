"""What the ClickHouse server in use can do, decided once from its `version()`.

The project supports ClickHouse 24.8 (the oldest LTS still maintained) and later: 24.8, 25.3 and
25.8 (LTS) and the current releases (docs/SCALING.md). A feature that came later than 24.8 is
switched off on an older server, with one notice line naming the version and what is off, so that
a build or a settle never fails halfway on an unknown setting. An older server than 24.8 is
refused at start with what to do.

`read_version(client)` is the only place the version is read; everything else takes a
`ServerVersion`, which tests build from a string (the seam where an older server is faked).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, cast

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

OLDEST_SUPPORTED = (24, 8)
SUPPORTED_RELEASES = ("24.8", "25.3", "25.8", "26.9")  # LTS releases, and the current one


@dataclass(frozen=True)
class Feature:
    key: str
    since: tuple[int, int]
    what: str  # what it is, as the notice names it
    instead: str  # what the project does without it


# Every setting or statement the project sends that 24.8 lacks (tests/loader/test_server_version
# checks the settings against the engine's own table of when each setting appeared).
FEATURES: tuple[Feature, ...] = (
    Feature(
        "patch_part_deletes",
        (25, 7),
        "patch-part deletes (lightweight_delete_mode = 'lightweight_update')",
        "classic lightweight deletes",
    ),
)


@dataclass(frozen=True, order=True)
class ServerVersion:
    major: int
    minor: int
    rest: str = ""  # patch and build, as reported

    @classmethod
    def parse(cls, text: str) -> ServerVersion:
        match = re.match(r"\s*(\d+)\.(\d+)(?:\.(.*))?", text)
        if not match:
            raise ValueError(f"cannot read a ClickHouse version from {text!r}")
        return cls(int(match[1]), int(match[2]), match[3] or "")

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + (f".{self.rest}" if self.rest else "")

    def has(self, key: str) -> bool:
        return (self.major, self.minor) >= feature(key).since

    def missing(self) -> tuple[Feature, ...]:
        return tuple(f for f in FEATURES if not self.has(f.key))

    def delete_settings(self) -> dict[str, Any]:
        """Settings of a `DELETE FROM` that should write patch parts where the server can."""
        if self.has("patch_part_deletes"):
            return {"lightweight_delete_mode": "lightweight_update"}
        return {}

    def dbt_vars(self) -> dict[str, Any]:
        """dbt vars that switch the models off what the server lacks (models/task_events.sql)."""
        return {} if self.has("patch_part_deletes") else {"task_events_patch_deletes": False}


def feature(key: str) -> Feature:
    for f in FEATURES:
        if f.key == key:
            return f
    raise KeyError(f"unknown feature {key!r}; known: {', '.join(f.key for f in FEATURES)}")


class UnsupportedServer(RuntimeError):
    pass


def notice(version: ServerVersion) -> str | None:
    """The one line saying what is off on this server, or None when nothing is."""
    off = version.missing()
    if not off:
        return None
    parts = "; ".join(f"{f.what} needs {f.since[0]}.{f.since[1]}, using {f.instead}" for f in off)
    return f"ClickHouse {version}: {parts}"


def check(version: ServerVersion) -> ServerVersion:
    """Refuse a server older than the oldest supported release, log what is off on the others."""
    if (version.major, version.minor) < OLDEST_SUPPORTED:
        oldest = ".".join(map(str, OLDEST_SUPPORTED))
        raise UnsupportedServer(
            f"ClickHouse {version} at CLICKHOUSE_HOST / CLICKHOUSE_PORT is older than {oldest}, "
            f"the oldest release this project supports; upgrade the server to {oldest} or later"
        )
    line = notice(version)
    if line:
        log.warning("%s", line)
    return version


def read_version(client: Client) -> ServerVersion:
    """`version()` of the server `client` talks to, checked (one notice line when features are
    off). Call once per process start: sync, follower, flow."""
    return check(ServerVersion.parse(str(cast(str, client.command("SELECT version()")))))
