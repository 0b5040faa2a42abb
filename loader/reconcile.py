"""Reconcile: repair what the watermark read cannot see, by comparing both sides in buckets.

The watermark read sees every write whose `updated_at` moves forward. It cannot see a document
that is gone, a write that became visible later than the overlap window allows, or an update
that moved `updated_at` backwards. Reconcile summarises each side per bucket of ids (count, and
XOR of a 64-bit hash of `_id` and `updated_at`), ships ids only for buckets that differ, then:
- tombstones ids live in ClickHouse but gone from Mongo (asked twice, see `_gone`);
- loads documents that ClickHouse lacks or holds with another `updated_at`, mapped as a sync
  maps them (bad ones go to `raw.rejects`). A document whose `updated_at` moved backwards is
  stored with `_version` one past the stored row's, so that it replaces it.
Ids known only from `raw.rejects` count with the `updated_at` of their last rejected document,
so an unchanged rejected document is not looked at again.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa
from bson import ObjectId
from bson.datetime_ms import DatetimeMS

from loader.clients import Clients, clickhouse_call, mongo_call, open_clients
from loader.deletes import CH_HASH, id_hash, write_tombstones
from loader.mapping import BatchMapper, MappedBatch, to_arrow
from loader.runs import PeakRss, RunRecord, new_run_id, write_run
from loader.schema import REJECTS, raw_table, require_collection
from loader.settings import Settings
from loader.sync import (
    WATERMARK_INDEX,
    prepare_clients,
    prepare_collection,
    projection,
    store_rejects,
    store_table,
    write_run_or_log,
)
from loader.watermark import now_ms

FETCH_CHUNK = 5_000  # documents fetched by `_id $in` per query when loading
# The version hash on both sides: the first 8 bytes of MD5("<hex id>:<updated_at ms>").
CH_VERSION_HASH = "reinterpretAsUInt64(substring(MD5(concat(_id, ':', toString(v))), 1, 8))"


def version_hash(hex_id: str, updated_at_ms: int) -> int:
    return int.from_bytes(hashlib.md5(f"{hex_id}:{updated_at_ms}".encode()).digest()[:8], "little")


def mongo_version(updated_at: Any) -> int:
    """`updated_at` in ms as both sides compare it; 0 when it is not a date."""
    return int(updated_at) if type(updated_at) is DatetimeMS else 0


class Stored(NamedTuple):
    """What ClickHouse holds for an id."""

    updated_at_ms: int
    live: bool  # a live row (else only rejects)
    version: int  # the live row's `_version`


@dataclass(frozen=True)
class ReconcileResult:
    run_id: str
    collection: str
    buckets: int
    mismatched_buckets: int
    mongo_ids: int
    clickhouse_ids: int
    deletes: int  # tombstones written
    missing_in_clickhouse: int  # in Mongo, not in ClickHouse: loaded (or rejected) now
    stale_in_clickhouse: int  # stored with another `updated_at`: loaded (or rejected) now
    rows_written: int
    rejects: int
    duration_s: float


def _bucket_count(known_ids: int) -> int:
    # About 2,000 ids per bucket: a mismatch ships few ids, the digest stays small.
    n = 16
    while n < 65_536 and n * 2_000 < known_ids:
        n *= 2
    return n


def _known_sql(collection: str) -> str:
    """(`_id`, `v` = updated_at ms, `live`, `version`) of every id ClickHouse accounts for: live
    rows, plus ObjectIds only ever rejected (they are in Mongo too; leaving them out would make
    every bucket differ). Takes parameter `c`."""
    table = raw_table(collection).qualified
    rejected_updated_at = (
        "toInt64OrZero(JSONExtractString(document, 'updated_at', '$date', '$numberLong'))"
    )
    return (
        "SELECT _id, toUnixTimestamp64Milli(updated_at) AS v, toUInt8(1) AS live, "
        f"_version AS version FROM {table} FINAL WHERE is_deleted = 0 UNION ALL "
        f"SELECT _id, argMax({rejected_updated_at}, rejected_at) AS v, toUInt8(0) AS live, "
        f"toUInt64(0) AS version FROM {REJECTS.qualified} WHERE collection = {{c:String}} "
        "AND length(_id) = 24 AND match(_id, '^[0-9a-f]+$') "
        f"AND _id NOT IN (SELECT _id FROM {table}) GROUP BY _id"
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
    buckets: int | None = None,
    max_ids_in_memory: int = 200_000,
) -> ReconcileResult:
    """Make `raw.<collection>` hold what Mongo holds now; see the module docstring."""
    require_collection(collection)
    started = time.monotonic()
    with open_clients(settings, clients) as cl:
        prepare_clients(cl)
        rec = RunRecord(new_run_id(), collection, kind="reconcile")
        rss = PeakRss()
        try:
            prepare_collection(cl, collection)
            run = _Reconcile(cl, collection, rec, rss)
            result = run.go(buckets, max_ids_in_memory, started)
        except BaseException as exc:
            rec.peak_rss_bytes = rss.peak
            rec.finish("failed", f"{type(exc).__name__}: {exc}")
            write_run_or_log(cl, rec)
            raise
        clickhouse_call(settings, lambda: write_run(cl.clickhouse, rec))
        return result


class _Reconcile:
    """State of one `reconcile_collection` call."""

    def __init__(self, cl: Clients, collection: str, rec: RunRecord, rss: PeakRss) -> None:
        self.cl = cl
        self.settings = cl.settings
        self.collection = collection
        self.rec = rec
        self.rss = rss
        self.known = _known_sql(collection)

    def _query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        ch = self.cl.clickhouse
        params["c"] = self.collection
        return clickhouse_call(self.settings, lambda: ch.query(sql, parameters=params).result_rows)

    def go(self, buckets: int | None, max_ids_in_memory: int, started: float) -> ReconcileResult:
        ch_total = int(self._query(f"SELECT count() FROM ({self.known})")[0][0])
        n = buckets or _bucket_count(ch_total)
        ch_digest = {
            int(b): (int(c), int(x))
            for b, c, x in self._query(
                f"SELECT {CH_HASH} % {{n:UInt64}} AS b, count(), groupBitXor({CH_VERSION_HASH}) "
                f"FROM ({self.known}) GROUP BY b",
                n=n,
            )
        }
        counts, xors = [0] * n, [0] * n
        mongo_total = 0
        for hex_id, v in _mongo_versions(self.cl, self.collection):
            b = id_hash(hex_id) % n
            counts[b] += 1
            xors[b] ^= version_hash(hex_id, v)
            mongo_total += 1
        self.rss.sample()
        bad = [b for b in range(n) if ch_digest.get(b, (0, 0)) != (counts[b], xors[b])]
        deletes = missing = stale = 0
        per_bucket = max(1, max(ch_total, mongo_total) // n)
        group = max(1, max_ids_in_memory // per_bucket)
        for start in range(0, len(bad), group):
            d, m, s = self._repair(n, bad[start : start + group])
            deletes, missing, stale = deletes + d, missing + m, stale + s
            self.rss.sample()
        rec = self.rec
        rec.deletes = deletes
        rec.peak_rss_bytes = self.rss.peak
        rec.finish(
            "ok",
            f"reconcile: {n} buckets, {len(bad)} differ; mongo ids={mongo_total}, "
            f"clickhouse ids={ch_total}; missing={missing} stale={stale} loaded "
            f"{rec.rows_written} rows, {rec.rejects} rejects",
        )
        return ReconcileResult(
            rec.run_id,
            self.collection,
            n,
            len(bad),
            mongo_total,
            ch_total,
            deletes,
            missing,
            stale,
            rec.rows_written,
            rec.rejects,
            time.monotonic() - started,
        )

    def _repair(self, n: int, chosen: list[int]) -> tuple[int, int, int]:
        """Tombstone, load; returns (tombstones, missing, stale) for the chosen buckets."""
        wanted = set(chosen)
        stored = {
            row[0]: Stored(int(row[1]), bool(row[2]), int(row[3]))
            for row in self._query(
                f"SELECT _id, v, live, version FROM ({self.known}) "
                f"WHERE {CH_HASH} % {{n:UInt64}} IN {{b:Array(UInt64)}}",
                n=n,
                b=chosen,
            )
        }
        in_mongo = {
            i: v for i, v in _mongo_versions(self.cl, self.collection) if id_hash(i) % n in wanted
        }
        gone = self._gone(set(stored) - set(in_mongo))
        deletes = write_tombstones(
            self.cl, self.collection, dict.fromkeys(gone, now_ms()), self.rec.run_id
        )
        # Dated too far ahead: not loaded yet, as in a sync (whose sweep rejects them).
        latest = now_ms() + int(self.settings.max_future_seconds * 1000)
        missing = [i for i, v in in_mongo.items() if i not in stored and v <= latest]
        stale = [
            i
            for i, v in in_mongo.items()
            if i in stored and stored[i].updated_at_ms != v and v <= latest
        ]
        self._load(missing + stale, stored)
        return deletes, len(missing), len(stale)

    def _gone(self, candidates: set[str]) -> list[str]:
        """A document inserted after the Mongo scan started would look deleted: ask again."""
        if not candidates:
            return []
        coll = self.cl.db[self.collection]
        ids = [ObjectId(i) for i in candidates]
        found = mongo_call(
            self.settings, lambda: list(coll.find({"_id": {"$in": ids}}, {"_id": 1}))
        )
        return sorted(candidates - {str(d["_id"]) for d in found})

    def _load(self, hex_ids: list[str], stored: dict[str, Stored]) -> None:
        coll = self.cl.db[self.collection]
        fields = projection(self.collection)
        for start in range(0, len(hex_ids), FETCH_CHUNK):
            ids = [ObjectId(i) for i in hex_ids[start : start + FETCH_CHUNK]]
            docs = mongo_call(
                self.settings, lambda ids=ids: list(coll.find({"_id": {"$in": ids}}, fields))
            )
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


def _replacing_version(updated_at_ms: int, stored: Stored | None) -> int:
    """`_version` for a row that must replace `stored`: its `updated_at`, or one past the
    stored row's version when `updated_at` moved backwards."""
    if stored is not None and stored.live and stored.version >= updated_at_ms:
        return stored.version + 1
    return updated_at_ms
