"""Is the MongoDB collection the one the raw table was loaded from? (`ops.source_identity`)

MongoDB gives every collection a UUID when it is created; a drop and re-create, a restore with
`--drop`, or a `MONGO_DB` pointing at another database all change it. The watermark of the old
collection means nothing for the new one (its documents may be dated before it), so a changed
UUID makes the next sync reload the collection from scratch, and its downstream models with it.
A collection that no longer exists while the warehouse holds documents of it stops the run
instead: that is far more often a mistyped `MONGO_URI` / `MONGO_DB` than an intended drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from loader.clients import Clients, clickhouse_call, mongo_call
from loader.cluster import insert_settings, rows_payload
from loader.errors import ActionableError
from loader.schema import SOURCE_IDENTITY, raw_table


class SourceMissing(ActionableError):
    """The collection is gone from MongoDB but the warehouse holds documents of it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "MONGO_URI / MONGO_DB", kind="settings", server="MongoDB")


@dataclass(frozen=True)
class Identity:
    collection: str
    current: str  # the collection's UUID now ("" when it does not exist)
    recorded: str  # the UUID the raw table was loaded from ("" when none is recorded)

    @property
    def replaced(self) -> bool:
        """True when the collection exists and is not the one the raw table holds."""
        return bool(self.current and self.recorded and self.current != self.recorded)

    def describe_replacement(self) -> str:
        return (
            f"the MongoDB collection {self.collection} was replaced (its UUID changed from "
            f"{self.recorded} to {self.current}: dropped and re-created, restored, or MONGO_DB "
            f"now names another database); raw.{self.collection} is reloaded from scratch and "
            "its downstream models are rebuilt"
        )


def collection_uuid(clients: Clients, collection: str) -> str:
    """The collection's UUID as hex, or "" when the collection does not exist."""
    db = clients.db
    infos = mongo_call(
        clients.settings, lambda: list(db.list_collections(filter={"name": collection}))
    )
    if not infos:
        return ""
    uuid = infos[0].get("info", {}).get("uuid")
    if isinstance(uuid, bytes):  # bson Binary, subtype 4 (pymongo's default representation)
        return uuid.hex()
    return str(getattr(uuid, "hex", uuid or ""))


def recorded_uuid(clients: Clients, collection: str) -> str:
    ch = clients.clickhouse
    rows = clickhouse_call(
        clients.settings,
        lambda: (
            ch.query(
                f"SELECT uuid FROM {SOURCE_IDENTITY.qualified} FINAL "
                "WHERE collection = {c:String}",
                parameters={"c": collection},
            ).result_rows
        ),
    )
    return str(rows[0][0]) if rows else ""


def check_identity(clients: Clients, collection: str) -> Identity:
    """Compare the collection with the one recorded; raise `SourceMissing` when it is gone
    while `raw.<collection>` holds documents of it."""
    identity = Identity(
        collection, collection_uuid(clients, collection), recorded_uuid(clients, collection)
    )
    if not identity.current and identity.recorded and _live_rows(clients, collection):
        settings = clients.settings
        raise SourceMissing(
            f"MongoDB database {settings.mongo_db!r} at {settings.redacted_mongo_uri()} has no "
            f"collection {collection!r}, but raw.{collection} holds documents loaded from it. "
            "Check MONGO_URI and MONGO_DB. If the collection was dropped on purpose, run "
            f"`python -m loader sync --collection {collection} --full-refresh` to empty the "
            "warehouse copy. Nothing was changed."
        )
    return identity


def check_followable(clients: Clients, collection: str) -> None:
    """`check_identity` for the change-stream follower, which records no identity: a MONGO_DB
    that names no database while raw holds documents of the collection (most often a typo)
    raises `SourceMissing`, before the follower saves any position (the stream of a collection
    that does not exist shows nothing, and its position would replace the real one). A
    collection dropped from an existing database is followed: its stream replays up to the
    drop, and the follower stops there."""
    databases = mongo_call(clients.settings, clients.mongo.list_database_names)
    if clients.settings.mongo_db not in databases:
        check_identity(clients, collection)


def record_identity(clients: Clients, collection: str, uuid: str, run_id: str) -> None:
    ch = clients.clickhouse
    row = [collection, clients.settings.mongo_db, uuid, run_id, datetime.now(UTC)]
    names = [n for n, _ in SOURCE_IDENTITY.columns]
    cluster = clients.settings.clickhouse_cluster
    dedup = insert_settings(cluster, SOURCE_IDENTITY.qualified, rows_payload(names, [row]))
    clickhouse_call(
        clients.settings,
        lambda: ch.insert(SOURCE_IDENTITY.qualified, [row], column_names=names, settings=dedup),
    )


def _live_rows(clients: Clients, collection: str) -> int:
    ch = clients.clickhouse
    table = raw_table(collection).qualified
    count = clickhouse_call(
        clients.settings,
        lambda: ch.command(
            f"SELECT count() FROM (SELECT 1 FROM {table} FINAL WHERE is_deleted = 0 LIMIT 1)"
        ),
    )
    return int(cast(int, count))
