"""Memory stays flat: loading 10x the documents barely moves the peak (from the run record)."""

from __future__ import annotations

import os
import subprocess
import sys

from clickhouse_connect.driver.client import Client
from pymongo.database import Database

from loader.settings import Settings
from loader.synthetic import seed

MARGIN = 1.15  # observed: about +7% for 10x the documents at the default batch size


def _peak_rss_of_a_fresh_full_load(settings: Settings, clickhouse_client: Client) -> int:
    """Run the CLI in a new process (so earlier work in this one cannot skew its memory) and
    read the peak RSS it recorded in ops.sync_runs."""
    env = os.environ | {"MONGO_DB": settings.mongo_db}
    subprocess.run(
        [sys.executable, "-m", "loader", "sync", "--collection", "tasks", "--full-refresh"],
        env=env,
        check=True,
        capture_output=True,
    )
    return int(
        clickhouse_client.command(
            "SELECT peak_rss_bytes FROM ops.sync_runs WHERE collection = 'tasks' "
            "AND kind = 'sync' AND status = 'ok' ORDER BY started_at DESC LIMIT 1"
        )
    )


def test_peak_memory_loading_200k_is_within_a_small_margin_of_20k(
    settings: Settings, db: Database, clickhouse_client: Client
) -> None:
    seed(db, 20_000, seed=401)
    small = _peak_rss_of_a_fresh_full_load(settings, clickhouse_client)
    seed(db, 200_000, seed=401)
    large = _peak_rss_of_a_fresh_full_load(settings, clickhouse_client)

    assert clickhouse_client.command("SELECT count() FROM raw.tasks FINAL") == 200_000
    assert large <= small * MARGIN, f"peak RSS {large >> 20} MiB vs {small >> 20} MiB"
