"""`python -m web` (`make web`): serve the dashboard at http://127.0.0.1:8050 until Ctrl-C.

Reads the same env vars as every other part (`CLICKHOUSE_*`, `REDIS_URL`, `PIPELINE_*`), plus
`PIPELINE_WEB_HOST`, `PIPELINE_WEB_PORT` and `PIPELINE_WEB_TOKEN` (see `web.settings`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket

from loader import errors


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def main(argv: list[str] | None = None) -> None:
    parser = errors.cli_parser("python -m web", __doc__)
    parser.add_argument("--host", help="listen address (default: PIPELINE_WEB_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: PIPELINE_WEB_PORT or 8050)")
    parser.add_argument(
        "--url", action="store_true", help="print the address and how to start it, then exit"
    )
    args = parser.parse_args(argv)
    if args.url:
        errors.run_cli(_print_url, verbose=args.verbose)
        return
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    errors.quiet_driver_logs(args.verbose)
    errors.run_cli(lambda: _serve(args), verbose=args.verbose)


def _print_url() -> None:
    from web.settings import WebSettings

    settings = WebSettings()
    print(
        f"The web dashboard: run `make web` (or `python -m web`), then open {settings.url}\n"
        "(`make serve` serves it too, beside the scheduled flow; PIPELINE_WEB_PORT picks the port)"
    )


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from flows import ops
    from web.server import check_bind, config
    from web.settings import WebSettings

    overrides = {}
    if args.host:
        overrides["web_host"] = args.host
    if args.port:
        overrides["web_port"] = args.port
    settings = WebSettings(**overrides)
    check_bind(settings)
    ops.connect(settings).close()  # ClickHouse answers (or the error names the variables)
    if not port_free(settings.web_host, settings.web_port):
        raise errors.ActionableError(
            f"port {settings.web_port} on {settings.web_host} is in use (another `make web` or "
            "`make serve`?): stop it or set PIPELINE_WEB_PORT",
            "PIPELINE_WEB_PORT",
            server="web dashboard",
        )
    print(f"Dashboard at {settings.url}  (Ctrl-C stops it)", flush=True)
    uvicorn.Server(config(settings)).run()


if __name__ == "__main__":
    main()
