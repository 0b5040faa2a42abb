"""dlt with its MongoDB source, the off-the-shelf alternative to our loader.

dlt ships its MongoDB source as a "verified source" that `dlt init mongodb <destination>`
copies from GitHub, which this machine cannot reach. `mongodb_collection` below follows that
source's default path (object format, not parallel): `find(filter, projection)`, read in chunks
of 10,000 with `islice`, every value passed through `map_nested_in_place` to turn ObjectIds into
strings and datetimes into pendulum datetimes, on a `MongoClient(tz_aware=True,
uuidRepresentation="standard")`.

dlt's ClickHouse destination runs its SQL through `clickhouse-driver`, i.e. ClickHouse's native
TCP protocol (port 9000/9440), and uses HTTP only for file uploads. The embedded ClickHouse
speaks HTTP only, so `try_load` attempts a real load (and reports why it fails) and the bench
then times what dlt does before the load: extract + normalize into the files it would load.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import dlt
from bson.decimal128 import Decimal128
from bson.objectid import ObjectId
from dlt.common.time import ensure_pendulum_datetime
from dlt.common.utils import map_nested_in_place
from pymongo import MongoClient

from loader.settings import Settings

CHUNK_SIZE = 10_000  # the verified source's default chunk_size
DATASET = "bench_dlt"


def _convert(value: Any) -> Any:
    if isinstance(value, ObjectId | Decimal128):
        return str(value)
    if isinstance(value, datetime):
        return ensure_pendulum_datetime(value)
    return value


def mongodb_collection(
    settings: Settings,
    collection: str,
    projection: dict[str, int] | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Any:
    """A dlt resource reading one collection the way dlt's MongoDB source does."""

    def documents() -> Iterator[list[dict[str, Any]]]:
        client: MongoClient = MongoClient(
            settings.mongo_uri, uuidRepresentation="standard", tz_aware=True
        )
        try:
            cursor = client[settings.mongo_db][collection].find(filter={}, projection=projection)
            while chunk := list(islice(cursor, chunk_size)):
                yield map_nested_in_place(_convert, chunk)
        finally:
            client.close()

    return dlt.resource(documents, name=collection, primary_key="_id", write_disposition="replace")


def _pipeline(settings: Settings, pipelines_dir: Path, native_port: int) -> Any:
    destination = dlt.destinations.clickhouse(
        credentials={
            "host": settings.clickhouse_host,
            "port": native_port,
            "http_port": settings.clickhouse_port,
            "username": settings.clickhouse_user,
            "password": settings.clickhouse_password.get_secret_value(),
            "database": "default",
            "secure": 0,
            "connect_timeout": 5,
        }
    )
    return dlt.pipeline(
        pipeline_name=f"bench_{uuid.uuid4().hex[:8]}",
        pipelines_dir=str(pipelines_dir),
        destination=destination,
        dataset_name=DATASET,
    )


def try_load(
    settings: Settings, pipelines_dir: Path, native_port: int, projection: dict[str, int]
) -> str | None:
    """Run one chunk through the whole pipeline; None if it loaded, else the error's text."""
    pipeline = _pipeline(settings, pipelines_dir, native_port)
    try:
        pipeline.run(mongodb_collection(settings, "tasks", projection).add_limit(1))
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        cause: BaseException = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:300]}"
    return None


def run(
    settings: Settings,
    pipelines_dir: Path,
    native_port: int,
    projection: dict[str, int],
    load: bool,
) -> int:
    """Extract + normalize (and load, when `load`) every task; returns the rows normalized."""
    pipeline = _pipeline(settings, pipelines_dir, native_port)
    pipeline.extract(mongodb_collection(settings, "tasks", projection))
    info = pipeline.normalize()
    rows = int(info.row_counts.get("tasks", 0))
    if load:
        pipeline.load()
    return rows
