"""Which sources' downstream dbt models still need a build (`ops.build_pending`).

Every loader write marks its collection pending before it writes (sync, reconcile and watch
alike, whether the flow runs them or a person runs the CLI), so the next flow run builds even
when no new document arrives. A full refresh (asked for, or forced by a replaced source) marks
`full_refresh`: the raw table was rebuilt, so the incremental models must be rebuilt too or they
would keep rows of documents that are gone. The flow clears a mark only after a build that
started after it, so a load during a build is built by the next run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

from loader.cluster import insert_settings, rows_payload, statement_payload
from loader.schema import BUILD_PENDING

COLUMNS = [name for name, _ in BUILD_PENDING.columns]


@dataclass(frozen=True)
class PendingBuild:
    source: str
    full_refresh: bool
    marked_at: datetime | None  # None: never built by the flow (a fresh warehouse)


def _write(client: Client, rows: list[list[object]]) -> None:
    if rows:
        dedup = insert_settings(None, BUILD_PENDING.qualified, rows_payload(COLUMNS, rows))
        client.insert(BUILD_PENDING.qualified, rows, column_names=COLUMNS, settings=dedup)


def mark_build_pending(
    client: Client, collection: str, run_id: str, *, full_refresh: bool = False
) -> None:
    """Mark `collection`'s downstream models as needing a build (before writing to raw).

    A pending full refresh stays a full refresh until a build clears it. One statement (the
    change-stream follower marks before every batch it stores); the time is the loader's clock,
    which the flow compares with its own when it clears marks."""
    table = BUILD_PENDING.qualified
    at = datetime.now(UTC)
    sql = (
        f"INSERT INTO {table} ({', '.join(COLUMNS)}) "
        "SELECT {c:String}, 1, greatest({full:UInt8}, (SELECT toUInt8(count() > 0) FROM "
        f"(SELECT * FROM {table} FINAL WHERE source = {{c:String}} AND pending = 1 "
        "AND full_refresh = 1))), {run:String}, fromUnixTimestamp64Micro({at:Int64}, 'UTC')"
    )
    parameters = {
        "c": collection,
        "full": int(full_refresh),
        "run": run_id,
        "at": int(at.timestamp() * 1_000_000),
    }
    dedup = insert_settings(None, table, statement_payload(sql, parameters))
    client.command(sql, parameters=parameters, settings=dedup)


def pending_builds(client: Client, sources: Iterable[str]) -> dict[str, PendingBuild]:
    """Sources whose downstream build is pending: marked, or never built by the flow (a fresh
    warehouse, or `ops` reset), since a partial selection assumes the rest already exists."""
    rows = client.query(
        f"SELECT source, pending, full_refresh, saved_at FROM {BUILD_PENDING.qualified} FINAL"
    ).result_rows
    state = {row[0]: row for row in rows}
    out: dict[str, PendingBuild] = {}
    for source in sources:
        row = state.get(source)
        if row is None:
            out[source] = PendingBuild(source, False, None)
        elif row[1]:
            out[source] = PendingBuild(source, bool(row[2]), row[3])
    return out


def clear_build_pending(
    client: Client, sources: Iterable[str], run_id: str, *, build_started_at: datetime
) -> list[str]:
    """Clear the marks of `sources` set before `build_started_at` (what the build covered);
    a mark set during the build stays. Returns the sources cleared."""
    wanted = list(sources)
    marks = pending_builds(client, wanted)
    started = build_started_at.astimezone(UTC).replace(tzinfo=None)
    cleared = [
        s
        for s in wanted
        if (mark := marks.get(s)) is None
        or mark.marked_at is None
        or mark.marked_at.replace(tzinfo=None) < started
    ]
    now = datetime.now(UTC)
    _write(client, [[s, 0, 0, run_id, now] for s in cleared])
    return cleared
