"""Reading both sides in comparable form."""

from __future__ import annotations

from typing import Any, Protocol

from clickhouse_connect.driver.client import Client
from pymongo.database import Database

from loader.sync import SyncResult

TASK_FIELDS = (
    "file_id",
    "stage",
    "employee_code",
    "employee_name",
    "status",
    "assigned_at",
    "updated_at",
)


def mongo_tasks(db: Database) -> dict[str, tuple[Any, ...]]:
    """`_id` hex → task fields (dates as epoch ms); `db` must read dates as DatetimeMS."""
    out = {}
    for doc in db.tasks.find({}):
        values = []
        for name in TASK_FIELDS:
            value = doc[name]
            values.append(int(value) if name.endswith("_at") else value)
        out[str(doc["_id"])] = tuple(values)
    return out


def clickhouse_tasks(client: Client, *, deleted: bool = False) -> dict[str, tuple[Any, ...]]:
    """`_id` → task fields of the current (deduplicated) version of every row."""
    cols = ", ".join(
        f"toUnixTimestamp64Milli({n})" if n.endswith("_at") else n for n in TASK_FIELDS
    )
    rows = client.query(
        f"SELECT _id, {cols} FROM raw.tasks FINAL WHERE is_deleted = {{d:UInt8}}",
        parameters={"d": int(deleted)},
    ).result_rows
    return {row[0]: tuple(row[1:]) for row in rows}


def run_record(client: Client, run_id: str) -> dict[str, Any]:
    result = client.query(
        "SELECT * FROM ops.sync_runs WHERE run_id = {r:String}", parameters={"r": run_id}
    )
    assert len(result.result_rows) == 1, f"expected one run record for {run_id}"
    return dict(zip(result.column_names, result.result_rows[0], strict=True))


class Loaded(Protocol):
    """The `loaded` fixture: seed `tasks`, sync it, optionally start following it."""

    def __call__(
        self,
        tasks: int,
        *,
        seed: int,
        follow: bool = False,
        into: Database | None = None,
        malformed_ratio: float = 0.0,
    ) -> SyncResult: ...
