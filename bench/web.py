"""The web dashboard's server time per page, cached and uncached, side by side.

The worker serves the real app (`web.server.BackgroundServer`, uvicorn on a free port) against
the bench's stack and requests each page over HTTP. The figure is the server's own time per
request, from its `Server-Timing: app;dur=` header (request in to response out, rendering
included; the network and the client are not). Pages: the overview `/`, a file
`/files/<id>`, an employee `/employees/<code>`, a search `/search?q=<prefix>` (ids and codes
drawn from the warehouse, the same sample for both modes).

- cached: every sample page was loaded once (the cache filled), then each is timed;
- uncached: the data and runs versions are bumped before each request (as after a landed
  build), so every query of the page misses the cache and goes to ClickHouse.
"""

from __future__ import annotations

import logging
import re
import urllib.request
from typing import Any

PAGES = ("overview", "file", "employee", "search")
TIMING = re.compile(r"app;dur=([0-9.]+)")


def _server_ms(url: str) -> float:
    with urllib.request.urlopen(url, timeout=120) as response:
        response.read()
        match = TIMING.search(response.headers.get("Server-Timing", ""))
    if match is None:
        raise RuntimeError(f"{url} answered without a Server-Timing header")
    return float(match.group(1))


def _sample_paths(ch: Any, runs: int) -> dict[str, list[str]]:
    files = [
        r[0]
        for r in ch.query(
            "SELECT file_id FROM analytics.pipeline_state ORDER BY cityHash64(file_id) "
            f"LIMIT {runs}"
        ).result_rows
    ]
    codes = [
        r[0]
        for r in ch.query(
            "SELECT employee_code FROM analytics.mart_employee_workload "
            f"ORDER BY cityHash64(employee_code) LIMIT {runs}"
        ).result_rows
    ]
    if not files or not codes:
        raise RuntimeError("no files or employees in the warehouse: build the models first")
    pick = lambda xs, i: xs[i % len(xs)]  # noqa: E731
    return {
        "overview": ["/"] * runs,
        "file": [f"/files/{pick(files, i)}" for i in range(runs)],
        "employee": [f"/employees/{pick(codes, i)}" for i in range(runs)],
        "search": [f"/search?q={pick(files, i)[:-2]}" for i in range(runs)],
    }


def latencies(runs: int) -> dict[str, Any]:
    """{page: {"cached": [ms...], "uncached": [ms...]}} for `runs` requests of each."""
    from devstack.process import free_ports
    from flows import ops
    from flows.cache import QueryCache
    from flows.redis_link import RedisLink
    from web.server import BackgroundServer
    from web.settings import WebSettings

    settings = WebSettings(web_host="127.0.0.1", web_port=free_ports(1)[0], web_token="")
    link = RedisLink(settings, logging.getLogger("bench.web"))
    cache = QueryCache(settings, link)
    if link.client() is None:
        raise RuntimeError(f"Redis at {settings.redis_url} is unreachable: no cache to measure")
    ch = ops.connect(settings)
    server = BackgroundServer(settings).start()
    try:
        paths = _sample_paths(ch, runs)
        out: dict[str, Any] = {}
        for page in PAGES:
            uncached = []
            for path in paths[page]:
                cache.bump_version()
                cache.bump_runs()
                uncached.append(_server_ms(server.url + path))
            for path in dict.fromkeys(paths[page]):  # fill the cache for every sample
                _server_ms(server.url + path)
            cached = [_server_ms(server.url + path) for path in paths[page]]
            out[page] = {"cached": cached, "uncached": uncached}
        return out
    finally:
        server.stop()
        ch.close()
        link.close()
