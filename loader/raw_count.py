"""The warehouse's side of a drift count without recounting a million rows every run.

`loader.drift.clickhouse_counts` counts the live documents of `raw.<collection>` below a cut
with FINAL, a quarter of a second at a million rows, which is most of a scheduled run that finds
nothing to do. Between two such runs the table usually has not changed at all: then the count
below the new cut is the count below the old one plus the live ids between the two cuts (a short
range of the primary key, FINAL per `_id` being the same whichever range it is read in).

"Not changed" is judged from the table's active parts (`system.parts`: how many, their rows,
highest block number and data version): an insert adds a part with a new block number, a merge
or mutation changes the parts or their rows, TRUNCATE removes them. A change that is not a
change of content (a merge) only costs one full count. The fingerprint is read before the count
it describes, so a write landing in between changes the fingerprint the next run sees.
"""

from __future__ import annotations

import json
from typing import Protocol

from bson import ObjectId
from clickhouse_connect.driver.client import Client

from loader.drift import rejected_only_sql
from loader.schema import RAW_DB, raw_table


class CountMemo(Protocol):
    """Where the last count of each collection is kept between runs (a Redis key, a dict)."""

    def get(self, collection: str) -> str | None: ...

    def set(self, collection: str, value: str) -> None: ...


def fingerprint(ch: Client, collection: str) -> str:
    row = ch.query(
        "SELECT count(), sum(rows), max(max_block_number), max(data_version) FROM system.parts "
        "WHERE database = {d:String} AND table = {t:String} AND active",
        parameters={"d": RAW_DB, "t": collection},
    ).result_rows[0]
    return ",".join(str(v) for v in row)


def _live_between(ch: Client, collection: str, low: str | None, cut: str) -> int:
    table = raw_table(collection).qualified
    above = "" if low is None else "AND _id >= {low:String} "
    sql = f"SELECT count() FROM {table} FINAL WHERE is_deleted = 0 {above}AND _id < {{cut:String}}"
    return int(str(ch.command(sql, parameters={"low": low or "", "cut": cut})))


def _rejected_only_below(ch: Client, collection: str, cut: str) -> int:
    # Restricted to the rejected ids: cheap whatever the size of the raw table.
    sql = f"SELECT count() FROM ({rejected_only_sql(collection)}) WHERE _id < {{cut:String}}"
    return int(str(ch.command(sql, parameters={"c": collection, "cut": cut})))


def remembered_count(ch: Client, collection: str, cut: ObjectId, memo: CountMemo) -> int:
    """The live count `clickhouse_counts` gives below `cut`, from the last count in `memo` when
    the raw table has not changed since (see the module docstring)."""
    mark = fingerprint(ch, collection)
    new_cut = str(cut)
    saved = _load(memo.get(collection))
    if saved is not None and saved["fingerprint"] == mark and str(saved["cut"]) <= new_cut:
        live = int(saved["live"]) + _live_between(ch, collection, str(saved["cut"]), new_cut)
    else:
        live = _live_between(ch, collection, None, new_cut)
    memo.set(collection, json.dumps({"fingerprint": mark, "cut": new_cut, "live": live}))
    return live + _rejected_only_below(ch, collection, new_cut)


def _load(text: str | None) -> dict[str, str | int] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    ok = isinstance(value, dict) and {"fingerprint", "cut", "live"} <= set(value)
    return value if ok else None
