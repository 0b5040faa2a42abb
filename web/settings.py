"""Settings of the web dashboard (env vars; unset = default), on top of the flow's settings.

`PIPELINE_WEB_HOST` / `PIPELINE_WEB_PORT`: where `make web` (and `make serve`) listen, loopback by
default. `PIPELINE_WEB_TOKEN`: the password every request must carry (HTTP Basic, any user
name, or `Authorization: Bearer <token>`); required when the host is not a loopback address.
`PIPELINE_WEB_OVERLOADED_TASKS`: open tasks from which an employee counts as overloaded (a page
may override it for one view). `PIPELINE_WEB_STALE_MINUTES`: the banner warns when the last
successful sync is older than this (default: twice `PIPELINE_SYNC_INTERVAL_MINUTES`).
`PIPELINE_WEB_REFRESH_SECONDS`: open pages also refresh this often, so times in stage keep
moving between builds (from the Redis cache; ClickHouse is not asked again).
`PIPELINE_WEB_LIVE_MIN_INTERVAL_SECONDS`: open pages are told of new data at most this often
(0.5 s by default), however often the data version moves. `PIPELINE_WEB_LAG_WARN_SECONDS`: the
banner warns when the live updates (the change-stream follower) are further behind MongoDB than
this (default 10 s).
"""

from __future__ import annotations

import ipaddress

from pydantic import Field

from flows.settings import FlowSettings
from loader.settings import Port


class WebSettings(FlowSettings):
    web_host: str = "127.0.0.1"
    web_port: Port = 8050
    web_token: str = ""
    web_overloaded_tasks: int = Field(160, ge=1)
    web_stale_minutes: float | None = Field(None, gt=0)
    web_refresh_seconds: float = Field(60.0, gt=0)
    web_live_min_interval_seconds: float = Field(0.5, ge=0)
    web_lag_warn_seconds: float = Field(10.0, gt=0)
    web_page_size: int = Field(25, ge=1, le=500)
    # Ageing buckets depend on the clock: recomputed at most this often, whatever the viewers.
    web_clock_ttl_seconds: int = Field(60, ge=1)

    @property
    def stale_after_minutes(self) -> float:
        return self.web_stale_minutes or 2 * self.sync_interval_minutes

    @property
    def url(self) -> str:
        host = self.web_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.web_port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
