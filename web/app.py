"""The Starlette application: pages rendered with Jinja2, charts by plotly.js, live updates over
server-sent events (`/events`, sse-starlette).

Routes: `/` (overview), `/files/<file_id>`, `/employees/<code>`, `/search?q=`, `/events`,
`/healthz`, `/static/...`. A request with the header `X-Partial: 1` gets only the part of the
page that changes with the data (what an open page swaps in after a `version` event). Every
response carries `Server-Timing` (`app`: the whole request in the server; `clickhouse`: time
spent in ClickHouse on cache misses) and `X-Cache` (hits and misses of the Redis cache).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import plotly
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows import ops
from flows.redis_link import WEB_WITHOUT_REDIS, RetryingRedisLink
from loader.clients import connect_clickhouse
from web import views
from web.data import Reader, ReadStats
from web.live import Broadcaster
from web.settings import WebSettings

HERE = Path(__file__).resolve().parent
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
logger = logging.getLogger("web")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)


class TimingMiddleware:
    """`Server-Timing: app;dur=<ms>` on every response, and the security headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - t0) * 1000
                headers = list(message.get("headers", []))
                extra = [h for h in headers if h[0].lower() == b"server-timing"]
                value = f"app;dur={ms:.2f}"
                if extra:
                    headers.remove(extra[0])
                    value = f"{value}, {extra[0][1].decode()}"
                headers.append((b"server-timing", value.encode()))
                headers.append((b"content-security-policy", CSP.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"same-origin"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


class TokenMiddleware:
    """Every request but `/healthz` must carry the token: HTTP Basic (any user name, the token
    as password: browsers ask once and resend it, EventSource included) or a Bearer header."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name != b"authorization":
                continue
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return secrets.compare_digest(credentials.strip(), self.token)
            if scheme.lower() == b"basic":
                try:
                    decoded = base64.b64decode(credentials.strip(), validate=True)
                except (binascii.Error, ValueError):
                    return False
                return secrets.compare_digest(decoded.partition(b":")[2], self.token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "This dashboard needs the password set in PIPELINE_WEB_TOKEN.",
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="pipeline dashboard", charset="UTF-8"'},
        )
        await response(scope, receive, send)


class Dashboard:
    """The server's shared parts: settings, the cached reader, the live broadcaster."""

    def __init__(self, settings: WebSettings):
        self.settings = settings
        self.link = RetryingRedisLink(settings, logger, without=WEB_WITHOUT_REDIS)
        # Sessionless (the factory's configuration): the pages' queries run concurrently, one
        # thread per request, and ClickHouse refuses concurrent queries within one session.
        self.ch = connect_clickhouse(settings)
        self.reader = Reader(settings, self.link, self.ch)
        self.broadcaster = Broadcaster(settings)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters["num"] = lambda n: "" if n is None else f"{int(n):,}"
        env.filters["fmt_time"] = views.fmt_time
        env.filters["iso"] = views.iso
        env.filters["fmt_age"] = views.fmt_age
        env.filters["secs"] = lambda s: f"{float(s or 0):.2f} s"
        env.globals["plotly_version"] = plotly.__version__
        env.globals["asset_version"] = _asset_version()

    def close(self) -> None:
        self.link.close()
        self.ch.close()


def _asset_version() -> str:
    newest = max(p.stat().st_mtime_ns for p in (HERE / "static").iterdir() if p.is_file())
    return format(newest // 1_000_000, "x")


def _render(
    request: Request, name: str, context: dict[str, Any], stats: ReadStats, status: int = 200
) -> Response:
    dash: Dashboard = request.app.state.dashboard
    versions = stats.versions or ("0", "0")
    context = {
        **context,
        "request": request,
        "version": f"{versions[0]}r{versions[1]}",
        "settings": dash.settings,
    }
    headers = {
        "X-Cache": f"hits={stats.hits}; misses={stats.misses}",
        "X-Versions": f"{versions[0]}r{versions[1]}",
        "Server-Timing": f"clickhouse;dur={stats.clickhouse_s * 1000:.2f}",
        "Cache-Control": "no-store",
    }
    if request.headers.get("x-partial") == "1":
        template = dash.templates.env.get_template(name)
        html = "".join(template.blocks["live"](template.new_context(context)))
        return HTMLResponse(html, status_code=status, headers=headers)
    return dash.templates.TemplateResponse(
        request, name, context, status_code=status, headers=headers
    )


def _stats(dash: Dashboard) -> ReadStats:
    stats = ReadStats()
    stats.versions = dash.reader.versions()
    return stats


def _trust(dash: Dashboard, stats: ReadStats) -> views.Trust:
    return views.trust(dash.reader, dash.settings, stats, views.now_ms())


# -- pages (plain functions: Starlette runs them in its thread pool) --------------------------
def overview(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard
    stats = _stats(dash)
    params = dict(request.query_params)
    context = views.overview(dash.reader, dash.settings, params, stats)
    context["trust"] = _trust(dash, stats)

    def workload_url(**changes: Any) -> str:
        keep = {k: params[k] for k in ("sort", "dir", "page", "overloaded", "only") if k in params}
        keep.update({k: str(v) for k, v in changes.items() if v is not None})
        for k, v in changes.items():
            if v is None:
                keep.pop(k, None)
        return "/?" + urlencode(keep) + "#workload"

    context["workload_url"] = workload_url
    return _render(request, "overview.html", context, stats)


def file_page(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard
    stats = _stats(dash)
    file_id = request.path_params["file_id"]
    context = views.file_page(dash.reader, file_id, stats)
    context["trust"] = _trust(dash, stats)
    found = context["current"] is not None or bool(context["tasks"])
    return _render(request, "file.html", context, stats, 200 if found else 404)


def employee_page(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard
    stats = _stats(dash)
    code = request.path_params["code"]
    context = views.employee_page(dash.reader, dash.settings, code, stats)
    context["trust"] = _trust(dash, stats)
    return _render(request, "employee.html", context, stats, 200 if context["person"] else 404)


def search(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard
    stats = _stats(dash)
    text = request.query_params.get("q", "")
    context = views.search(dash.reader, text, stats)
    files, people = context["files"], context["employees"]
    exact = [f for f in files if f["file_id"] == context["q"]]
    exact_people = [p for p in people if p["employee_code"].lower() == context["q"].lower()]

    def to_file(file_id: str) -> Response:
        return RedirectResponse(f"/files/{quote(file_id, safe='')}", status_code=303)

    def to_employee(code: str) -> Response:
        return RedirectResponse(f"/employees/{quote(code, safe='')}", status_code=303)

    if exact and not exact_people:
        return to_file(exact[0]["file_id"])
    if exact_people and not exact:
        return to_employee(exact_people[0]["employee_code"])
    if len(files) + len(people) == 1 and not context["more_files"]:
        return to_file(files[0]["file_id"]) if files else to_employee(people[0]["employee_code"])
    context["trust"] = _trust(dash, stats)
    return _render(request, "search.html", context, stats)


async def events(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard
    return EventSourceResponse(
        dash.broadcaster.events(), ping=15, headers={"Cache-Control": "no-store"}
    )


def health(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard
    versions = dash.reader.versions()
    return JSONResponse(
        {
            "ok": True,
            "redis": versions is not None,
            "versions": versions,
            "live_listener": dash.broadcaster.connected,
            "viewers": dash.broadcaster.viewers,
        }
    )


def plotly_js(request: Request) -> Response:
    return FileResponse(
        PLOTLY_JS,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


def create_app(settings: WebSettings | None = None) -> Starlette:
    settings = settings or WebSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dash = Dashboard(settings)
        app.state.dashboard = dash
        with contextlib.suppress(Exception):  # the run tables, if no flow ran yet
            ops.ensure_tables(dash.ch)
        await dash.broadcaster.start()
        try:
            yield
        finally:
            await dash.broadcaster.stop()
            dash.close()

    app = Starlette(
        routes=[
            Route("/", overview),
            Route("/files/{file_id:path}", file_page),
            Route("/employees/{code:path}", employee_page),
            Route("/search", search),
            Route("/events", events),
            Route("/healthz", health),
            Route("/static/vendor/plotly.min.js", plotly_js),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(TimingMiddleware)
    if settings.web_token:
        app.add_middleware(TokenMiddleware, token=settings.web_token)
    return app
