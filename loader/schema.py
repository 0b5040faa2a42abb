"""DDL of the loader's ClickHouse tables (`raw.*`, `ops.*`) and a small additive migrator.

The column lists here are the single source of truth: `mapping.py` builds rows in exactly this
order and `docs/ARCHITECTURE.md` documents them. Migration is additive: a missing column is added
with `ALTER TABLE ... ADD COLUMN`; a column whose type changed is reported, not rewritten (that
needs `sync --full-refresh` after dropping the table, a decision for a human).

Cluster mode (`CLICKHOUSE_CLUSTER` set, `cluster` below): every table becomes a replicated local
table `<db>.<name>_local` on each shard plus a `Distributed` table under the public name, which
every reader and writer keeps using; each statement carries `ON CLUSTER`. Without a cluster the
statements are exactly the single-server ones. Why each sharding key: docs/SCALING.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import cast

from clickhouse_connect.driver.client import Client

from loader.cluster import configured_cluster

log = logging.getLogger(__name__)

RAW_DB = "raw"
OPS_DB = "ops"

# Where a local table's replicas meet in Keeper; `{shard}` and `{replica}` are each server's macros
# (deploy/clickhouse/macros-*.xml), `{database}` and `{table}` ClickHouse expands itself.
REPLICA_PATH = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
LOCAL_SUFFIX = "_local"

# Bookkeeping columns present on every raw table, after the document's own columns.
BOOKKEEPING: tuple[tuple[str, str], ...] = (
    ("_version", "UInt64"),
    ("is_deleted", "UInt8"),
    ("_loaded_at", "DateTime64(3, 'UTC')"),
    ("_run_id", "String"),
)
ID_COLUMNS: tuple[tuple[str, str], ...] = (
    ("_id", "String"),
    ("_id_created_at", "DateTime('UTC')"),
)


@dataclass(frozen=True)
class Field:
    """One mapped document field: Mongo name (= column name), ClickHouse type, value kind."""

    name: str
    ch_type: str
    kind: str  # "str", "datetime" or "bool"


COLLECTION_FIELDS: dict[str, tuple[Field, ...]] = {
    "tasks": (
        Field("file_id", "String", "str"),
        Field("stage", "LowCardinality(String)", "str"),
        Field("employee_code", "LowCardinality(String)", "str"),
        Field("employee_name", "String", "str"),
        Field("status", "LowCardinality(String)", "str"),
        Field("assigned_at", "DateTime64(3, 'UTC')", "datetime"),
        Field("updated_at", "DateTime64(3, 'UTC')", "datetime"),
    ),
    "employee": (
        Field("employee_code", "String", "str"),
        Field("employee_name", "String", "str"),
        Field("team", "LowCardinality(String)", "str"),
        Field("active", "UInt8", "bool"),
        Field("updated_at", "DateTime64(3, 'UTC')", "datetime"),
    ),
}
COLLECTIONS: tuple[str, ...] = tuple(COLLECTION_FIELDS)


def require_collection(collection: str) -> None:
    if collection not in COLLECTIONS:
        raise ValueError(f"unknown collection {collection!r}; choose from {', '.join(COLLECTIONS)}")


def raw_columns(collection: str) -> tuple[tuple[str, str], ...]:
    """(name, type) of every column of `raw.<collection>`, in insert order."""
    fields = tuple((f.name, f.ch_type) for f in fields_of(collection))
    return ID_COLUMNS + fields + BOOKKEEPING


def fields_of(collection: str) -> tuple[Field, ...]:
    try:
        return COLLECTION_FIELDS[collection]
    except KeyError:
        raise ValueError(
            f"unknown collection {collection!r}; the loader knows {', '.join(COLLECTIONS)}"
        ) from None


@dataclass(frozen=True)
class Table:
    database: str
    name: str
    columns: tuple[tuple[str, str], ...]
    engine: str
    order_by: str
    partition_by: str | None = None
    # Data-skipping indexes as (name, definition); added to existing tables by the migrator.
    indexes: tuple[tuple[str, str], ...] = ()
    ttl: str | None = None
    # Cluster mode: the Distributed table's sharding key. Rows that a FINAL, a ranking or a
    # delete must see together hash alike, so those stay shard-local (docs/SCALING.md).
    shard_key: str = "rand()"

    @property
    def qualified(self) -> str:
        return f"{self.database}.{self.name}"

    def create_sql(self, cluster: str = "") -> str:
        cols = ",\n  ".join(
            [f"`{n}` {t}" for n, t in self.columns] + [f"INDEX {n} {d}" for n, d in self.indexes]
        )
        sql = (
            f"CREATE TABLE IF NOT EXISTS {self.qualified}{on_cluster(cluster)} (\n  {cols}\n) "
            f"ENGINE = {self.engine}"
        )
        if self.partition_by:
            sql += f"\nPARTITION BY {self.partition_by}"
        sql += f"\nORDER BY {self.order_by}"
        return sql + (f"\nTTL {self.ttl}" if self.ttl else "")


def on_cluster(cluster: str) -> str:
    """The `ON CLUSTER` clause of a DDL statement; empty on a single server."""
    return f" ON CLUSTER '{cluster}'" if cluster else ""


def replicated_engine(engine: str) -> str:
    """`ReplacingMergeTree(v)` -> `ReplicatedReplacingMergeTree('<path>', '{replica}', v)`."""
    name, _, args = engine.partition("(")
    args = args.removesuffix(")")
    return f"Replicated{name}({REPLICA_PATH}{', ' + args if args else ''})"


def local_table(table: Table, cluster: str) -> Table:
    """The table that holds the rows: `table` itself on one server, else its replicated local
    table on each shard (mutations, partitions and skip indexes go there)."""
    if not cluster:
        return table
    return replace(table, name=table.name + LOCAL_SUFFIX, engine=replicated_engine(table.engine))


def distributed_sql(table: Table, cluster: str) -> str:
    local = local_table(table, cluster)
    return (
        f"CREATE TABLE IF NOT EXISTS {table.qualified}{on_cluster(cluster)} AS {local.qualified}\n"
        f"ENGINE = Distributed('{cluster}', '{table.database}', '{local.name}', {table.shard_key})"
    )


def create_statements(table: Table, cluster: str = "") -> list[str]:
    """What creates `table`: one statement on a server; the local tables, then the
    Distributed table over them, on a cluster."""
    if not cluster:
        return [table.create_sql()]
    return [local_table(table, cluster).create_sql(cluster), distributed_sql(table, cluster)]


def mutation_target(table: Table, cluster: str = "") -> str:
    """What a `DELETE FROM`, `TRUNCATE TABLE` or `ALTER ... DROP PARTITION` names: a Distributed
    table takes none of them, so on a cluster they go to every local table."""
    return local_table(table, cluster).qualified + on_cluster(cluster)


def raw_table(collection: str) -> Table:
    # Sorting key `_id` alone: every other field of a document may change, and the engine only
    # collapses rows with equal sorting keys. The partition key is the ObjectId's creation month,
    # which never changes, so all versions of a document meet in one partition.
    return Table(
        RAW_DB,
        collection,
        raw_columns(collection),
        "ReplacingMergeTree(_version)",
        "_id",
        "toYYYYMM(_id_created_at)",
        # Parts and granules hold rows of one or a few loads, so the min/max of `_loaded_at`
        # lets dbt's incremental read ("loaded since the last build") skip all older data.
        indexes=(("idx_loaded_at", "_loaded_at TYPE minmax GRANULARITY 1"),),
        # By `_id`, not `file_id`: a task can move to another file, and all versions of a
        # document must meet on one shard for ReplacingMergeTree and FINAL to collapse them.
        shard_key="cityHash64(_id)",
    )


REJECTS = Table(
    RAW_DB,
    "rejects",
    (
        ("collection", "LowCardinality(String)"),
        ("_id", "String"),
        ("reason", "String"),
        ("document", "String"),
        ("run_id", "String"),
        ("rejected_at", "DateTime64(3, 'UTC')"),
        # 1: the rejected document is gone from MongoDB (found by reconcile); it no longer
        # counts as a document the warehouse accounts for.
        ("is_deleted", "UInt8 DEFAULT 0"),
    ),
    "MergeTree",
    "(collection, _id, rejected_at)",
    shard_key="cityHash64(_id)",  # beside the raw rows of the same document
)
WATERMARKS = Table(
    OPS_DB,
    "watermarks",
    (
        ("collection", "String"),
        ("updated_at", "DateTime64(3, 'UTC')"),
        ("last_id", "String"),
        ("read_started_at", "DateTime64(3, 'UTC')"),
        ("run_id", "String"),
        ("saved_at", "DateTime64(6, 'UTC')"),
    ),
    "ReplacingMergeTree(saved_at)",
    "collection",
    # Every save of one collection on one shard, so FINAL collapses them there.
    shard_key="cityHash64(collection)",
)
SYNC_RUNS = Table(
    OPS_DB,
    "sync_runs",
    (
        ("run_id", "String"),
        ("collection", "String"),
        ("kind", "LowCardinality(String) DEFAULT 'sync'"),
        ("status", "LowCardinality(String)"),
        ("started_at", "DateTime64(3, 'UTC')"),
        ("ended_at", "DateTime64(3, 'UTC')"),
        ("duration_s", "Float64"),
        ("docs_read", "UInt64"),
        ("rows_written", "UInt64"),
        ("rejects", "UInt64"),
        ("deletes", "UInt64"),
        ("watermark_before", "String"),
        ("watermark_after", "String"),
        ("peak_rss_bytes", "UInt64"),
        ("message", "String"),
        ("shard", "LowCardinality(String) DEFAULT ''"),
    ),
    "MergeTree",
    "(started_at, run_id)",
    shard_key="cityHash64(run_id)",
)
CHANGE_STREAM_STATE = Table(
    OPS_DB,
    "change_stream_state",
    (
        ("collection", "String"),
        ("resume_token", "String"),
        ("events", "UInt64"),
        ("saved_at", "DateTime64(6, 'UTC')"),
        # How far behind MongoDB the follower was when it saved: seconds from the last event's
        # commit (wallTime) to its batch being stored and settled; 0 when it had caught up.
        ("lag_seconds", "Float64 DEFAULT 0"),
        ("last_event_at", "Nullable(DateTime64(3, 'UTC'))"),
    ),
    "ReplacingMergeTree(saved_at)",
    "collection",
    shard_key="cityHash64(collection)",
)
# The MongoDB collection each raw table is a copy of (its UUID, which a drop, a re-create or a
# restore changes): a different UUID on the next run means "reload from scratch".
SOURCE_IDENTITY = Table(
    OPS_DB,
    "source_identity",
    (
        ("collection", "String"),
        ("mongo_db", "String"),
        ("uuid", "String"),
        ("run_id", "String"),
        ("recorded_at", "DateTime64(6, 'UTC')"),
    ),
    "ReplacingMergeTree(recorded_at)",
    "collection",
    shard_key="cityHash64(collection)",
)
# Document counts of both sides, compared by every flow run (`loader.drift`).
DRIFT_CHECKS = Table(
    OPS_DB,
    "drift_checks",
    (
        ("checked_at", "DateTime64(3, 'UTC')"),
        ("collection", "String"),
        ("mongo_count", "UInt64"),
        ("clickhouse_count", "UInt64"),
        ("counted_before", "DateTime64(3, 'UTC')"),
        ("run_id", "String"),
        ("note", "String"),
    ),
    "MergeTree",
    "(checked_at, collection)",
    shard_key="cityHash64(collection)",
)
# A source whose downstream dbt models need a build: set by every loader write (sync, reconcile,
# watch, from the flow or the CLI) before it writes, cleared by the flow after a build that
# started later. `full_refresh`: the raw table was rebuilt, so incremental models must be too.
BUILD_PENDING = Table(
    OPS_DB,
    "build_pending",
    (
        ("source", "String"),
        ("pending", "UInt8"),
        ("full_refresh", "UInt8 DEFAULT 0"),
        ("run_id", "String"),
        ("saved_at", "DateTime64(6, 'UTC')"),
    ),
    "ReplacingMergeTree(saved_at)",
    "source",
    shard_key="cityHash64(source)",
)
# Lists of ids too long for a URL (`loader.idset`): one partition per list, dropped after use.
ID_SETS = Table(
    OPS_DB,
    "id_sets",
    (
        ("set_id", "String"),
        ("key", "String"),
        ("value", "Int64"),
        ("created_at", "DateTime('UTC') DEFAULT now()"),
    ),
    "MergeTree",
    "(set_id, key)",
    shard_key="cityHash64(key)",  # as raw.<c>'s `_id`: a set joins the raw rows of its shard
    partition_by="set_id",
    ttl="created_at + INTERVAL 1 DAY",
)
# The initial snapshot by `_id` range (`loader.snapshot`): one row per range of a plan when it is
# made, then one per stored batch (`last_id`: the last `_id` stored, canonical extended JSON) and
# one when the range is done. The latest row of each range is its state.
SNAPSHOT_RANGES = Table(
    OPS_DB,
    "snapshot_ranges",
    (
        ("collection", "String"),
        ("plan_id", "String"),
        ("workers", "UInt16"),
        ("range_index", "UInt16"),
        ("lower", "String"),  # inclusive `_id` bound, extended JSON; "" = from the lowest
        ("upper", "String"),  # exclusive `_id` bound; "" = to the highest
        ("last_id", "String"),
        ("docs", "UInt64"),
        ("done", "UInt8"),
        ("started_at", "DateTime64(3, 'UTC')"),  # taken before the resume point
        ("run_id", "String"),
        ("saved_at", "DateTime64(6, 'UTC')"),
    ),
    "ReplacingMergeTree(saved_at)",
    "(collection, plan_id, range_index)",
    shard_key="cityHash64(collection)",
)
OPS_TABLES: tuple[Table, ...] = (
    WATERMARKS,
    SYNC_RUNS,
    CHANGE_STREAM_STATE,
    SOURCE_IDENTITY,
    DRIFT_CHECKS,
    BUILD_PENDING,
    ID_SETS,
    SNAPSHOT_RANGES,
)


def all_tables() -> tuple[Table, ...]:
    return tuple(raw_table(c) for c in COLLECTIONS) + (REJECTS,) + OPS_TABLES


def _strip_default(ch_type: str) -> str:
    return ch_type.split(" DEFAULT ", 1)[0]


def _normalise(ch_type: str) -> str:
    return ch_type.replace(" ", "")


def migrate_table(client: Client, table: Table, cluster: str = "") -> list[str]:
    """Create `table` if missing, add missing columns; return the changes made (for logs).

    On a cluster the local table decides: a missing one is created with its Distributed table,
    and a column is added to both (the Distributed table's columns are what readers see)."""
    changes: list[str] = []
    local = local_table(table, cluster)
    exists = client.command(
        "SELECT count() FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": local.database, "t": local.name},
    )
    if not int(cast(int, exists)):
        for statement in create_statements(table, cluster):
            client.command(statement)
        return [f"created {table.qualified}"]
    present: dict[str, str] = {
        name: ch_type
        for name, ch_type in client.query(
            "SELECT name, type FROM system.columns "
            "WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": local.database, "t": local.name},
        ).result_rows
    }
    holders = [local, table] if cluster else [table]
    previous = None
    for name, ch_type in table.columns:
        if name not in present:
            after = f" AFTER `{previous}`" if previous else " FIRST"
            for holder in holders:
                client.command(
                    f"ALTER TABLE {holder.qualified}{on_cluster(cluster)} "
                    f"ADD COLUMN IF NOT EXISTS `{name}` {ch_type}{after}"
                    if cluster
                    else f"ALTER TABLE {holder.qualified} ADD COLUMN `{name}` {ch_type}{after}"
                )
            changes.append(f"added column {table.qualified}.{name} {ch_type}")
        elif _normalise(present[name]) != _normalise(_strip_default(ch_type)):
            log.warning(
                "%s.%s is %s but the loader expects %s; drop the table and run "
                "`python -m loader sync --full-refresh` to rebuild it",
                table.qualified,
                name,
                present[name],
                ch_type,
            )
        previous = name
    for name, definition in table.indexes:
        # Covers only parts written from now on; older parts are read in full until merged.
        client.command(
            f"ALTER TABLE {local.qualified}{on_cluster(cluster)} "
            f"ADD INDEX IF NOT EXISTS {name} {definition}"
        )
    return changes


def _schema_is_current(client: Client, cluster: str = "") -> bool:
    """True when every loader table has its columns (with their types) and skip indexes: two
    queries, so that a run with nothing to migrate (most runs, and every no-op sync) does not
    pay a round trip per table. On a cluster: the local and the Distributed tables."""
    dbs = sorted({RAW_DB, OPS_DB})
    present: dict[tuple[str, str], dict[str, str]] = {}
    for db, table, name, ch_type in client.query(
        "SELECT database, table, name, type FROM system.columns "
        "WHERE database IN {d:Array(String)}",
        parameters={"d": dbs},
    ).result_rows:
        present.setdefault((db, table), {})[name] = ch_type
    indexes = {
        (db, table, name)
        for db, table, name in client.query(
            "SELECT database, table, name FROM system.data_skipping_indices "
            "WHERE database IN {d:Array(String)}",
            parameters={"d": dbs},
        ).result_rows
    }
    for public in all_tables():
        local = local_table(public, cluster)
        for table in {public.name: public, local.name: local}.values():
            columns = present.get((table.database, table.name))
            if columns is None:
                return False
            for name, ch_type in table.columns:
                if name not in columns or _normalise(columns[name]) != _normalise(
                    _strip_default(ch_type)
                ):
                    return False
        if any((local.database, local.name, name) not in indexes for name, _ in local.indexes):
            return False
    return True


def ensure_schema(client: Client, cluster: str | None = None) -> list[str]:
    """Create or migrate every loader table. Idempotent; returns what changed.

    `cluster`: `Settings.clickhouse_cluster` (empty: one server; None: read it from the
    environment, so that no caller can create single-server tables on a cluster)."""
    if cluster is None:
        cluster = configured_cluster()
    if _schema_is_current(client, cluster):
        return []
    for db in (RAW_DB, OPS_DB):
        client.command(f"CREATE DATABASE IF NOT EXISTS {db}{on_cluster(cluster)}")
    changes: list[str] = []
    for table in all_tables():
        changes.extend(migrate_table(client, table, cluster))
    for change in changes:
        log.info("schema: %s", change)
    return changes
