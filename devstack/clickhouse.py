"""Launcher of the ClickHouse HTTP front (`devstack.clickhouse_http`) as a server process.

The front itself is the package `devstack.clickhouse_http`; this module only starts, probes and
stops it the same way as the other servers of the stack (`Service`: one readiness wait for all).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from devstack.process import MissingBinaryError, NotReadyError
from devstack.service import Service

CHDB_PACKAGE = "chdb-core"


class ClickHouseServer(Service):
    name = "clickhouse"
    # chdb merges and flushes on shutdown; give it time before SIGKILL.
    stop_timeout = 60.0

    def __init__(
        self,
        data_dir: Path,
        port: int,
        user: str = "default",
        password: str | None = None,
        options: Sequence[str] = (),
    ) -> None:
        super().__init__(data_dir, port)
        self.user = user
        self.password = password or None
        # More command-line options of the front (e.g. `--max-concurrent-queries 2`).
        self.options = list(options)

    def url_at(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "clickhouse"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "clickhouse.log"

    def command(self) -> list[str]:
        for module, package in (("chdb", CHDB_PACKAGE), ("devstack.clickhouse_http", None)):
            if importlib.util.find_spec(module) is None:
                what = f"the package `{package}`" if package else f"the module `{module}`"
                raise MissingBinaryError(
                    f"ClickHouse cannot start: {what} is not installed in this Python "
                    "environment. Fix: run `make setup` (it installs the project and its "
                    "dependencies into .venv)."
                )
        cmd = [
            sys.executable,
            "-m",
            "devstack.clickhouse_http",
            "--data-dir",
            str(self.db_path),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.password:
            # The password itself travels in the environment (`child_env`): a command line is
            # readable by every local user (`ps`) and is written to the server's log.
            cmd += ["--user", self.user]
        return cmd + self.options

    def child_env(self) -> dict[str, str] | None:
        # Always set, so a password in the caller's environment never leaks into a server
        # started without one.
        return {**os.environ, "CLICKHOUSE_PASSWORD": self.password or ""}

    def prepare_dirs(self) -> None:
        super().prepare_dirs()
        self.db_path.mkdir(parents=True, exist_ok=True)

    def check_ready(self) -> None:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as resp:
                body = resp.read().decode(errors="replace").strip()
        except (urllib.error.URLError, OSError) as exc:
            raise NotReadyError(f"/ping does not answer yet: {exc}") from exc
        if body != "Ok.":
            raise NotReadyError(f"/ping answered {body!r}, expected 'Ok.'")
