"""Reconcile: repair what the watermark read cannot see, by comparing both sides by id.

The watermark read sees every write whose `updated_at` moves forward. It cannot see a document
that is gone, a write that became visible later than the overlap window allows, or an update
that moved `updated_at` backwards. Reconcile compares every id on both sides:
1. MongoDB's `(_id, updated_at)` pairs (a covered scan of the watermark index) are uploaded to
   ClickHouse as an id set (`loader.idset`: request bodies, never URLs).
2. ClickHouse joins them with the ids it accounts for (live rows, and ids known only from
   `raw.rejects`, with the `updated_at` of their last rejected document) and stores the ids
   that differ as another id set.
3. Those are repaired page by page (`page_size` ids at a time):
   - ids live in ClickHouse but gone from Mongo (asked again, see `_gone`) get a tombstone;
     ids known only from `raw.rejects` get a rejects row marked `is_deleted`;
   - documents that ClickHouse lacks or holds with another `updated_at` are loaded, mapped as
     a sync maps them (bad ones go to `raw.rejects`). A document whose `updated_at` moved
     backwards is stored with `_version` one past the stored row's, so that it replaces it.
The client holds one upload chunk or one page at a time, so memory stays bounded whatever the
size of the collection and the number of differences; the join runs in ClickHouse.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import pyarrow as pa
from bson import ObjectId
from bson.datetime_ms import DatetimeMS
from pymongo.collection import Collection

from loader.build_pending import mark_build_pending
from loader.clients import Clients, clickhouse_call, mongo_call, open_clients
from loader.cluster import insert_settings, statement_payload
from loader.drift import rejected_only_sql
from loader.idset import IdSet, id_set
from loader.mapping import BatchMapper, MappedBatch, to_arrow
from loader.runs import PeakRss, RunKind, RunRecord, RunStatus, new_run_id
from loader.schema import ID_SETS, raw_table, require_collection
from loader.settings import Settings
from loader.store import (
    insert_rejects,
    recorded_run,
    store_rejects,
    store_table,
    write_tombstones,
)
from loader.sync import WATERMARK_INDEX, prepare_clients, prepare_collection, projection
from loader.watermark import now_ms

FETCH_CHUNK = 5_000  # documents fetched by `_id $in` per query
REPAIR_CHUNK = 10_000  # differences repaired per round of writes
# `value` of an id that differs because MongoDB no longer has it (else MongoDB's updated_at ms).
GONE = -(2**63)
INSERT_TARGET = re.compile(r"INSERT INTO ([\w.]+)")
GONE_REASON = "deleted in MongoDB"


def mongo_version(updated_at: Any) -> int:
    """`updated_at` in ms as both sides compare it; 0 when it is not a date."""
    return int(updated_at) if type(updated_at) is DatetimeMS else 0


class Stored(NamedTuple):
    """What ClickHouse holds for an id."""

    updated_at_ms: int
    live: bool  # a live row (else only rejects)
    version: int  # the live row's `_version`


@dataclass(frozen=True)
class Difference:
    """An id whose two sides disagree: absent from Mongo (`mongo_ms` None), absent from
    ClickHouse (`stored` None), or present on both with another `updated_at`."""

    hex_id: str
    mongo_ms: int | None
    stored: Stored | None


@dataclass(frozen=True)
class ReconcileResult:
    run_id: str
    collection: str
    mongo_ids: int
    clickhouse_ids: int
    differing: int  # ids whose two sides disagree
    deletes: int  # tombstones written
    missing_in_clickhouse: int  # in Mongo, not in ClickHouse: loaded (or rejected) now
    stale_in_clickhouse: int  # stored with another `updated_at`: loaded (or rejected) now
    rows_written: int
    rejects: int
    rejected_gone: int  # ids known only from rejects, gone from Mongo: marked deleted
    duration_s: float

    @property
    def repaired(self) -> bool:
        return bool(self.deletes or self.rows_written or self.rejects or self.rejected_gone)


def known_sql(collection: str) -> str:
    """(`_id`, `v` = updated_at ms, `live`, `version`) of every id ClickHouse accounts for: live
    rows, plus ObjectIds known only from rejects. Takes parameter `c`."""
    table = raw_table(collection).qualified
    return (
        "SELECT _id, toUnixTimestamp64Milli(updated_at) AS v, toUInt8(1) AS live, "
        f"_version AS version FROM {table} FINAL WHERE is_deleted = 0 UNION ALL "
        "SELECT _id, v, toUInt8(0) AS live, toUInt64(0) AS version "
        f"FROM ({rejected_only_sql(collection)})"
    )


def _mongo_versions(cl: Clients, collection: str) -> Iterator[tuple[str, int]]:
    """(hex id, updated_at ms) of every document with an ObjectId (others are never loaded):
    a covered scan of the watermark index while no `updated_at` holds an array."""
    coll = cl.db[collection]
    cursor = mongo_call(
        cl.settings,
        lambda: coll.find({}, {"_id": 1, "updated_at": 1}).hint(WATERMARK_INDEX).batch_size(50_000),
    )
    for doc in cursor:
        oid = doc["_id"]
        if type(oid) is ObjectId:
            yield str(oid), mongo_version(doc.get("updated_at"))


def reconcile_collection(
    settings: Settings,
    collection: str,
    *,
    clients: Clients | None = None,
    page_size: int = 100_000,
) -> ReconcileResult:
    """Make `raw.<collection>` hold what Mongo holds now; see the module docstring.

    `page_size`: differing ids repaired per page (bounds memory)."""
    require_collection(collection)
    started = time.monotonic()
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        rec = RunRecord(new_run_id(), collection, kind=RunKind.reconcile)
        rss = PeakRss()
        with recorded_run(cl, rec, rss):
            prepare_collection(cl, collection)
            result = _Reconcile(cl, collection, rec, rss, page_size).go(started)
        return result


class _Reconcile:
    """State of one `reconcile_collection` call."""

    def __init__(
        self, cl: Clients, collection: str, rec: RunRecord, rss: PeakRss, page_size: int
    ) -> None:
        self.cl = cl
        self.settings = cl.settings
        self.collection = collection
        self.rec = rec
        self.rss = rss
        self.page_size = page_size
        self.known = known_sql(collection)
        self.deletes = self.missing = self.stale = self.rejected_gone = 0
        self.marked_pending = False

    def _cluster_settings(self, sql: str, params: dict[str, Any]) -> dict[str, Any]:
        """On a cluster: id sets and raw rows are both sharded by the id, so each shard matches
        its own (`distributed_product_mode = 'local'`); an insert carries a token of its
        statement and values (a retry of it is stored once)."""
        cluster = self.settings.clickhouse_cluster
        if not cluster:
            return {}
        out: dict[str, Any] = {"distributed_product_mode": "local"}
        insert = INSERT_TARGET.match(sql)
        if insert:
            out |= insert_settings(cluster, insert.group(1), statement_payload(sql, params))
        return out

    def _command(self, sql: str, **params: Any) -> None:
        ch = self.cl.clickhouse
        params["c"] = self.collection
        extra = self._cluster_settings(sql, params)
        clickhouse_call(self.settings, lambda: ch.command(sql, parameters=params, settings=extra))

    def _query(self, sql: str, **params: Any) -> Sequence[Sequence[Any]]:
        ch = self.cl.clickhouse
        params["c"] = self.collection
        extra = self._cluster_settings(sql, params)
        return clickhouse_call(
            self.settings, lambda: ch.query(sql, parameters=params, settings=extra).result_rows
        )

    def go(self, started: float) -> ReconcileResult:
        mongo = _mongo_versions(self.cl, self.collection)
        with id_set(self.cl, mongo) as in_mongo, id_set(self.cl, []) as differing:
            self.rss.sample()
            # A missing side reads as defaults (join_use_nulls = 0): the flags tell which.
            self._command(
                f"INSERT INTO {ID_SETS.qualified} (set_id, key, value) "
                f"SELECT '{differing.set_id}', if(ch.in_ch = 1, ch._id, m.key), "
                f"if(m.in_mongo = 1, m.value, {GONE}) "
                f"FROM (SELECT _id, v, toUInt8(1) AS in_ch FROM ({self.known})) AS ch "
                "FULL OUTER JOIN "
                f"(SELECT key, value, toUInt8(1) AS in_mongo FROM {in_mongo.pairs()}) AS m "
                "ON ch._id = m.key "
                "WHERE NOT (ch.in_ch = 1 AND m.in_mongo = 1 AND ch.v = m.value)"
            )
            mongo_total = self._count(in_mongo.keys())
            ch_total = int(self._query(f"SELECT count() FROM ({self.known})")[0][0])
            differ = self._count(differing.keys())
            self._repair_pages(differing)
        rec = self.rec
        rec.deletes = self.deletes
        rec.finish(
            RunStatus.ok,
            f"reconcile: mongo ids={mongo_total}, clickhouse ids={ch_total}, {differ} differ: "
            f"missing={self.missing} stale={self.stale} loaded {rec.rows_written} rows, "
            f"{rec.rejects} rejects; {self.deletes} tombstones, "
            f"{self.rejected_gone} rejected documents gone",
        )
        return ReconcileResult(
            run_id=rec.run_id,
            collection=self.collection,
            mongo_ids=mongo_total,
            clickhouse_ids=ch_total,
            differing=differ,
            deletes=self.deletes,
            missing_in_clickhouse=self.missing,
            stale_in_clickhouse=self.stale,
            rows_written=rec.rows_written,
            rejects=rec.rejects,
            rejected_gone=self.rejected_gone,
            duration_s=time.monotonic() - started,
        )

    def _count(self, subquery: str) -> int:
        return int(self._query(f"SELECT count() FROM {subquery}")[0][0])

    def _repair_pages(self, differing: IdSet) -> None:
        """Repair the differing ids `page_size` at a time, in id order."""
        after = ""
        while True:
            page = self._query(
                f"SELECT key, value FROM {differing.pairs()} WHERE key > {{after:String}} "
                "ORDER BY key LIMIT {limit:UInt64}",
                after=after,
                limit=self.page_size,
            )
            if not page:
                return
            last = page[-1][0]
            stored = {
                row[0]: Stored(int(row[1]), bool(row[2]), int(row[3]))
                for row in self._query(
                    f"SELECT _id, v, live, version FROM ({self.known}) WHERE _id IN "
                    f"(SELECT key FROM {differing.pairs()} "
                    "WHERE key > {after:String} AND key <= {last:String})",
                    after=after,
                    last=last,
                )
            }
            found = [Difference(i, None if v == GONE else int(v), stored.get(i)) for i, v in page]
            for start in range(0, len(found), REPAIR_CHUNK):
                self._repair_chunk(found[start : start + REPAIR_CHUNK])
            self.rss.sample()
            after = last

    def _repair_chunk(self, chunk: list[Difference]) -> None:
        self._mark_pending()
        gone = self._gone({d.hex_id: d.stored for d in chunk if d.mongo_ms is None})
        tombstoned = {i: now_ms() for i, stored in gone.items() if stored and stored.live}
        self.deletes += write_tombstones(self.cl, self.collection, tombstoned, self.rec.run_id)
        self._mark_rejects_gone([i for i, stored in gone.items() if stored and not stored.live])
        # Dated too far ahead: not loaded yet, as in a sync (whose sweep rejects them).
        latest = now_ms() + int(self.settings.max_future_seconds * 1000)
        load = [d for d in chunk if d.mongo_ms is not None and d.mongo_ms <= latest]
        self.missing += sum(1 for d in load if d.stored is None)
        self.stale += sum(1 for d in load if d.stored is not None)
        self._load([d.hex_id for d in load], {d.hex_id: d.stored for d in load if d.stored})

    def _mark_pending(self) -> None:
        """The downstream models need a build once this run writes anything."""
        if not self.marked_pending:
            ch = self.cl.clickhouse
            clickhouse_call(
                self.settings,
                lambda: mark_build_pending(ch, self.collection, self.rec.run_id),
            )
            self.marked_pending = True

    def _gone(self, candidates: dict[str, Stored | None]) -> dict[str, Stored | None]:
        """A document inserted after the Mongo read started would look deleted: ask again."""
        coll = self.cl.db[self.collection]
        keys = list(candidates)
        still_there: set[str] = set()
        for start in range(0, len(keys), FETCH_CHUNK):
            ids = [ObjectId(i) for i in keys[start : start + FETCH_CHUNK]]
            found = mongo_call(self.settings, partial(_find, coll, ids, {"_id": 1}))
            still_there.update(str(d["_id"]) for d in found)
        return {i: s for i, s in candidates.items() if i not in still_there}

    def _mark_rejects_gone(self, hex_ids: list[str]) -> None:
        """Ids known only from rejects and gone from Mongo: a rejects row marked deleted, so
        they no longer count as documents the warehouse accounts for."""
        if not hex_ids:
            return
        rows = [(i, GONE_REASON, "") for i in hex_ids]
        insert_rejects(self.cl, self.collection, rows, self.rec.run_id, deleted=True)
        self.rejected_gone += len(hex_ids)

    def _load(self, hex_ids: list[str], stored: dict[str, Stored]) -> None:
        coll = self.cl.db[self.collection]
        fields = projection(self.collection)
        for start in range(0, len(hex_ids), FETCH_CHUNK):
            ids = [ObjectId(i) for i in hex_ids[start : start + FETCH_CHUNK]]
            docs = mongo_call(self.settings, partial(_find, coll, ids, fields))
            mapper = BatchMapper(self.collection, self.settings.max_string_chars)
            for doc in docs:
                mapper.add(doc)
            batch = mapper.take()
            self._store(batch, stored)
            self.rec.docs_read += len(docs)

    def _store(self, batch: MappedBatch, stored: dict[str, Stored]) -> None:
        if batch.rows:
            table = to_arrow(batch, self.rec.run_id, now_ms())
            versions = [
                _replacing_version(ms, stored.get(i))
                for i, ms in zip(batch.columns["_id"], batch.columns["updated_at"], strict=True)
            ]
            at = table.schema.get_field_index("_version")
            table = table.set_column(at, "_version", pa.array(versions, pa.uint64()))
            store_table(self.cl, self.collection, table)
            self.rec.rows_written += batch.rows
        # An id known only from `raw.rejects` that still does not map is recorded already.
        fresh = [r for r in batch.rejects if (s := stored.get(str(r.id))) is None or s.live]
        if fresh:
            store_rejects(
                self.cl, MappedBatch(self.collection, {"_id": []}, fresh), self.rec.run_id
            )
            self.rec.rejects += len(fresh)


def _find(coll: Collection, ids: list[ObjectId], fields: dict[str, int]) -> list[dict[str, Any]]:
    return list(coll.find({"_id": {"$in": ids}}, fields))


def _replacing_version(updated_at_ms: int, stored: Stored | None) -> int:
    """`_version` for a row that must replace `stored`: its `updated_at`, or one past the
    stored row's version when `updated_at` moved backwards."""
    if stored is not None and stored.live and stored.version >= updated_at_ms:
        return stored.version + 1
    return updated_at_ms
