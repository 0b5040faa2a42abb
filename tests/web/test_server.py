"""The server itself, over plain HTTP: loopback by default, a password anywhere else, the
part of each page that open pages swap in, and the event stream."""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from loader.errors import ActionableError
from web.server import BackgroundServer, check_bind
from web.settings import WebSettings

if TYPE_CHECKING:
    from conftest import Site


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_listening_beyond_loopback_needs_a_password(host: str) -> None:
    with pytest.raises(ActionableError, match="PIPELINE_WEB_TOKEN"):
        check_bind(WebSettings(web_host=host, web_token=""))
    check_bind(WebSettings(web_host=host, web_token="s3cret"))
    check_bind(WebSettings(web_host="127.0.0.1", web_token=""))
    check_bind(WebSettings(web_host="localhost", web_token=""))


def test_with_a_token_every_request_needs_it(site: Site) -> None:
    from devstack.process import free_ports

    token = "correct horse battery staple"
    settings = WebSettings(web_port=free_ports(1)[0], web_token=token)
    server = BackgroundServer(settings).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            refused = http.get("/")
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Basic")
            assert http.get("/", auth=("anyone", "wrong")).status_code == 401
            assert http.get("/", auth=("anyone", token)).status_code == 200
            bearer = {"Authorization": f"Bearer {token}"}
            assert http.get("/files/x", headers=bearer).status_code == 404  # in, not found
            assert http.get("/static/app.css").status_code == 401
            assert http.get("/healthz").status_code == 200  # for a load balancer's probe
            basic = base64.b64encode(f"u:{token}".encode()).decode()
            with http.stream("GET", "/events", headers={"Authorization": f"Basic {basic}"}) as r:
                assert r.status_code == 200
    finally:
        server.stop()


def test_each_page_serves_the_part_an_open_page_swaps_in(site: Site) -> None:
    file_id = site.scalar("SELECT min(file_id) FROM analytics.pipeline_state")
    code = site.scalar("SELECT min(employee_code) FROM analytics.mart_employee_workload")
    with httpx.Client(base_url=site.url, timeout=60) as http:
        for path in ("/", f"/files/{file_id}", f"/employees/{code}", "/search?q=F"):
            full = http.get(path)
            part = http.get(path, headers={"X-Partial": "1"})
            assert full.status_code == part.status_code == 200, (path, part.text[-500:])
            assert "<html" in full.text and "<html" not in part.text
            assert 'id="trust"' in part.text and 'id="main"' in part.text
            assert part.headers["x-versions"] == full.headers["x-versions"]
            assert part.headers["server-timing"].startswith("app;dur=")


def test_the_event_stream_announces_a_version_bump(site: Site) -> None:
    import logging

    from flows.cache import QueryCache
    from flows.redis_link import RedisLink

    link = RedisLink(site.settings, logging.getLogger("test"))
    cache = QueryCache(site.settings, link)
    try:
        with (
            httpx.Client(base_url=site.url, timeout=30) as http,
            http.stream("GET", "/events") as stream,
        ):
            events = _events(stream.iter_lines())
            first = next(events)
            assert first["event"] == "version"
            now = json.loads(first["data"])
            version = cache.bump_version()
            bumped = next(e for e in events if e["event"] == "version")
            assert json.loads(bumped["data"]) == {"data": str(version), "runs": now["runs"]}
    finally:
        link.close()


def _events(lines: Any) -> Any:
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "event" in event:
                yield event
            event = {}
        elif ":" in line and not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = value.strip()
