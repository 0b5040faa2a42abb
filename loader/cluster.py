"""Cluster mode at insert time: the settings every insert carries when `CLICKHOUSE_CLUSTER` is set.

A retried insert (a timeout after the server stored the rows, a replica lost mid-request) must be
stored once. Replicated tables drop a block whose `insert_deduplication_token` they have seen
(Keeper keeps the last `replicated_deduplication_window` tokens per table), so the token is a
hash of what the batch holds: a retry of the same batch sends the same token, another batch
another one. `deduplicate_blocks_in_dependent_materialized_views` extends that to the views fed
by the insert (dbt's `pipeline_state_*_mv`). `distributed_foreground_insert` makes an insert into
a Distributed table return only once every shard has stored its part, so the loader saves its
watermark after the rows are on the shards, not in the initiator's send queue.

DDL of cluster mode is `loader.schema`'s job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pyarrow is slow to import; the short commands insert JSON rows only
    import pyarrow as pa

DEDUP_VIEWS = "deduplicate_blocks_in_dependent_materialized_views"
FOREGROUND = "distributed_foreground_insert"


def configured_cluster() -> str:
    """`CLICKHOUSE_CLUSTER` as the settings class reads it, for callers holding only a client."""
    from loader.settings import Settings

    return Settings().clickhouse_cluster


def dedup_token(table: str, payload: Iterable[bytes | memoryview]) -> str:
    """Same table and same bytes -> same token; the table is part of it so that equal rows sent
    to two tables never collide."""
    digest = hashlib.sha256(table.encode())
    for part in payload:
        digest.update(part)
    return f"{table}:{digest.hexdigest()[:40]}"


def insert_settings(
    cluster: str | None, table: str, payload: Iterable[bytes | memoryview]
) -> dict[str, Any]:
    """The settings of one insert of `payload` into `table`; none on a single server (there the
    statements stay what they always were). `cluster` None: `CLICKHOUSE_CLUSTER` from the
    environment (for the bookkeeping writes whose callers hold only a client)."""
    if cluster is None:
        cluster = configured_cluster()
    if not cluster:
        return {}
    token = dedup_token(table, payload)
    return {"insert_deduplication_token": token, DEDUP_VIEWS: 1, FOREGROUND: 1}


def arrow_payload(batch: pa.Table) -> Iterator[memoryview]:
    """The column buffers of an Arrow table, hashed without copying them."""
    for column in batch.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    yield memoryview(buffer)


def statement_payload(sql: str, parameters: dict[str, Any]) -> Iterator[bytes]:
    """An `INSERT ... SELECT`: its text and bound values (each call binds its own run id or
    time, so only a retry of the same call repeats them)."""
    yield sql.encode()
    yield repr(sorted(parameters.items())).encode()


def rows_payload(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    """Row values as text: `repr` of str, int, float, datetime is stable for equal values."""
    yield repr(tuple(columns)).encode()
    for row in rows:
        yield repr(tuple(row)).encode()
