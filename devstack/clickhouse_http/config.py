"""The server's configuration (command-line options of `python -m devstack.clickhouse_http`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8123
    user: str = "default"
    password: str = ""
    display_name: str = "chdb-http"
    # Statements run at once; the others wait in line up to queue_max_wait_s (admission.py).
    max_concurrent_queries: int = 8
    queue_max_wait_s: float = 300.0
