"""The HTTP server: routes, the session reaper, start-up and shutdown, the command line.

    python -m devstack.clickhouse_http --data-dir .data/clickhouse --port 8123

Routes: `/` (queries, handler.py), `/ping` and `/replicas_status` (health checks that never wait
for the engine), `GET /` without a query (ClickHouse's "Ok."), and `/status` (this server's
own: what runs, what waits and for how long, which sessions are open; not a ClickHouse route).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import uvicorn
from anyio.to_thread import run_sync
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from devstack.clickhouse_http.admission import Admission
from devstack.clickhouse_http.config import ServerConfig
from devstack.clickhouse_http.engine import Engine
from devstack.clickhouse_http.handler import QueryHandler
from devstack.clickhouse_http.limits import H11_MAX_INCOMPLETE_EVENT_SIZE, RequestHeadLimits
from devstack.clickhouse_http.sessions import SessionRegistry

log = logging.getLogger("devstack.clickhouse_http")

SESSION_REAPER_INTERVAL_S = 1.0  # ClickHouse closes expired sessions in 1 s buckets, too


class Front:
    """The parts of a running server, wired together."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine = Engine(config.data_dir)
        self.sessions = SessionRegistry(self.engine.connect)
        self.admission = Admission(config.max_concurrent_queries, config.queue_max_wait_s)
        self.queries = QueryHandler(self.engine, self.sessions, self.admission, config)

    def status(self) -> dict[str, object]:
        return {
            "version": self.engine.version,
            "timezone": self.engine.timezone,
            "queries": self.admission.status(),
            "sessions": self.sessions.snapshot(),
        }

    async def reap_sessions(self) -> None:
        while True:
            await anyio.sleep(SESSION_REAPER_INTERVAL_S)
            await run_sync(self.sessions.expire)

    def close(self) -> None:
        self.sessions.close_all()
        self.engine.close()


class Root:
    """`/`: a query, or (a bare GET) ClickHouse's http_server_default_response, a health check."""

    def __init__(self, queries: QueryHandler) -> None:
        self.queries = queries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in ("GET", "HEAD") and not scope["query_string"]:
            await PlainTextResponse("Ok.\n")(scope, receive, send)
            return
        await self.queries(scope, receive, send)


def build_app(front: Front) -> Starlette:
    async def ping(request: Request) -> Response:
        return PlainTextResponse("Ok.\n")

    async def status(request: Request) -> Response:
        return JSONResponse(front.status())

    return Starlette(
        routes=[
            Route("/ping", ping, methods=["GET", "HEAD"]),
            Route("/replicas_status", ping, methods=["GET"]),
            Route("/status", status, methods=["GET"]),
            Route("/", Root(front.queries), methods=["GET", "HEAD", "POST"]),
        ],
        middleware=[Middleware(RequestHeadLimits)],
    )


class _Server(uvicorn.Server):
    """uvicorn, plus: at shutdown, stop the engine's statements before waiting for requests.

    uvicorn waits for every request to end before it exits; a statement that runs for an hour
    would hold the shutdown (and the data flush) for an hour, then be killed.
    """

    def __init__(self, config: uvicorn.Config, front: Front) -> None:
        super().__init__(config)
        self.front = front

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.front.admission.closing = True
        await run_sync(self.front.engine.kill_all)
        await super().shutdown(sockets)


def serve(config: ServerConfig) -> None:
    """Open the data dir, serve until SIGTERM/SIGINT, then close the engine (flushes data)."""
    front = Front(config)
    server = _Server(
        uvicorn.Config(
            build_app(front),
            host=config.host,
            port=config.port,
            log_level="warning",
            log_config=None,  # keep this process's logging setup (stderr)
            access_log=False,
            lifespan="off",
            http="h11",  # the head limit below is h11's; httptools, if installed, has its own
            h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_SIZE,
        ),
        front,
    )

    async def announce() -> None:
        while not server.started:
            await anyio.sleep(0.05)
        url = f"http://{config.host}:{config.port}"
        print(f"clickhouse-http ready on {url}", file=sys.stderr, flush=True)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(announce)
            tg.start_soon(front.reap_sessions)
            await server.serve()
            tg.cancel_scope.cancel()

    def stop(signum: int, frame: object) -> None:
        # uvicorn swaps in its own handler while serving and re-raises the signal once it has
        # stopped; landing here then lets us close the engine and exit 0 instead of dying.
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        anyio.run(main)
    finally:
        front.close()
        log.info("chdb engine closed")
    if not server.started:
        raise SystemExit(
            f"clickhouse-http could not listen on {config.host}:{config.port} (is the port taken?)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.clickhouse_http",
        description="Serve ClickHouse's HTTP interface over the embedded ClickHouse engine (chdb).",
    )
    parser.add_argument("--data-dir", required=True, help="chdb data dir (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8123, help="port to bind (default 8123)")
    parser.add_argument("--user", default="default", help="accepted user name (default 'default')")
    parser.add_argument(
        "--password",
        default=None,
        help="required password (default: env CLICKHOUSE_PASSWORD, else none)",
    )
    defaults = ServerConfig(Path("."))
    parser.add_argument(
        "--max-concurrent-queries",
        type=int,
        default=defaults.max_concurrent_queries,
        help="statements run at once; the others wait in line "
        f"(default {defaults.max_concurrent_queries})",
    )
    parser.add_argument(
        "--queue-max-wait",
        type=float,
        default=defaults.queue_max_wait_s,
        help="seconds a request waits in line before TOO_MANY_SIMULTANEOUS_QUERIES "
        f"(default {defaults.queue_max_wait_s:g})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    password = args.password
    if password is None:
        password = os.environ.get("CLICKHOUSE_PASSWORD", "")
    serve(
        ServerConfig(
            Path(args.data_dir),
            args.host,
            args.port,
            args.user or "default",
            password,
            max_concurrent_queries=args.max_concurrent_queries,
            queue_max_wait_s=args.queue_max_wait,
        )
    )
