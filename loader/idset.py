"""Id sets: lists of ids shipped to ClickHouse in a request body, never in its URL.

ClickHouse takes a URL of up to 1 MiB and each query parameter of up to 128 KiB
(`http_max_uri_size`, `http_max_field_value_size`): about 4,000 ObjectIds in one parameter.
Reconcile after a mass delete and the reject sweep need far more, so they insert the ids into
`ops.id_sets` (an INSERT sends its rows in the body), filter with `IdSet.keys()` /
`IdSet.pairs()` subqueries, and drop the set's partition when done. A TTL removes what a
crashed run left behind.

On a cluster the sets are sharded by key, like the raw rows they select (both by the document
id): a query filtering raw rows by a set runs with `IdSet.settings` (`distributed_product_mode =
'local'`), so each shard matches its raw rows against its own part of the set.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from loader.clients import Clients, clickhouse_call
from loader.cluster import insert_settings, rows_payload
from loader.schema import ID_SETS, mutation_target

log = logging.getLogger(__name__)

INSERT_CHUNK = 100_000  # rows per INSERT: bounded request bodies and client memory


@dataclass(frozen=True)
class IdSet:
    set_id: str  # hex, generated here: safe to inline in SQL
    cluster: str = ""

    @property
    def settings(self) -> dict[str, Any]:
        """The settings of a query using `keys()` / `pairs()` on a Distributed table."""
        return {"distributed_product_mode": "local"} if self.cluster else {}

    def keys(self) -> str:
        """A subquery of the set's keys, for `... IN {keys()}`."""
        return f"(SELECT key FROM {ID_SETS.qualified} WHERE set_id = '{self.set_id}')"

    def pairs(self) -> str:
        """A subquery of `(key, value)` rows, to join on."""
        return f"(SELECT key, value FROM {ID_SETS.qualified} WHERE set_id = '{self.set_id}')"


@contextmanager
def id_set(clients: Clients, items: Iterable[tuple[str, int]]) -> Iterator[IdSet]:
    """Store `(key, value)` pairs as a new set for the duration of the block."""
    ch = clients.clickhouse
    cluster = clients.settings.clickhouse_cluster
    ids = IdSet(uuid.uuid4().hex, cluster)
    chunk: list[list[object]] = []
    names = ["set_id", "key", "value"]

    def flush() -> None:
        rows = list(chunk)
        dedup = insert_settings(cluster, ID_SETS.qualified, rows_payload(names, rows))
        clickhouse_call(
            clients.settings,
            lambda: ch.insert(ID_SETS.qualified, rows, column_names=names, settings=dedup),
        )
        chunk.clear()

    try:
        for key, value in items:
            chunk.append([ids.set_id, key, value])
            if len(chunk) >= INSERT_CHUNK:
                flush()
        if chunk:
            flush()
        yield ids
    finally:
        try:
            target = mutation_target(ID_SETS, cluster)
            ch.command(f"ALTER TABLE {target} DROP PARTITION '{ids.set_id}'")
        except Exception as exc:  # noqa: BLE001 - the TTL removes it; an error in flight matters more
            log.warning("could not drop id set %s (its TTL will): %s", ids.set_id, exc)
