"""Run the dashboard with uvicorn: in the foreground (`python -m web`, `make web`) or in a
thread beside the scheduled flow (`flows.serve`)."""

from __future__ import annotations

import threading
import time

import uvicorn

from loader import errors
from web.app import create_app
from web.settings import WebSettings, is_loopback


def check_bind(settings: WebSettings) -> None:
    """Loopback by default; anywhere else only with a password."""
    if not is_loopback(settings.web_host) and not settings.web_token:
        raise errors.ActionableError(
            f"the dashboard would listen on {settings.web_host}, which is not a loopback "
            "address, without a password: set PIPELINE_WEB_TOKEN (or PIPELINE_WEB_HOST="
            "127.0.0.1)",
            "PIPELINE_WEB_TOKEN",
            server="web dashboard",
        )


def config(settings: WebSettings, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.web_host,
        port=settings.web_port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
    )


class BackgroundServer:
    """uvicorn in a daemon thread; `start()` returns once it listens (or raises)."""

    def __init__(self, settings: WebSettings, log_level: str = "warning"):
        check_bind(settings)
        self.settings = settings
        self.server = uvicorn.Server(config(settings, log_level))
        self.thread = threading.Thread(target=self.server.run, name="web-dashboard", daemon=True)

    @property
    def url(self) -> str:
        return self.settings.url

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise errors.ActionableError(
                    f"the web dashboard could not listen on {self.settings.web_host}:"
                    f"{self.settings.web_port}: is the port in use? Set PIPELINE_WEB_PORT.",
                    "PIPELINE_WEB_PORT",
                    server="web dashboard",
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the web dashboard did not start within {timeout_s:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
