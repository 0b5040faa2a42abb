"""Settle `analytics.pipeline_state_store` after the change-stream follower stores a batch.

The store, the materialized view that feeds it from `raw.tasks` and the parameterized view used
here are dbt's (`macros/pipeline_state.sql`); this module only calls them. The view makes
every stored task version a candidate current state of its file in the same INSERT. What it
cannot express is a retraction: a deleted task, `assigned_at` moved backwards, a task moved to
another file, or a version older than one already stored. After each batch (in its settling
thread, while the next batch is being stored; batches stored meanwhile are settled together)
the follower settles the files its retracting tasks (`RetractingTasks`: deletes, moves, new
`assigned_at`s) ever had a version in or are in now: `pipeline_state_recomputed` reads, in one
query, those files (`touched`), the current versions of their tasks from raw and the rows the
store holds for them; `Recomputation` chooses each file's best row and the rows raw
supersedes, by the rules a build's settle applies in SQL; `_settle` replaces what differs: the
best rows are inserted first, then the rows that outrank them and that raw supersedes deleted,
so a reader sees the old or the new state of a file, then the best rows of the files that lost
a row are inserted once more (a merge that ends after the delete may have dropped them). The
view runs as its SELECT text (`ViewTexts`): faster than a call, same SQL.

It needs no memory of earlier batches: `pipeline_state_members` says where a task's candidates
are, so a batch replayed after a crash (the resume token is saved only after this step) settles
the same way, whoever loaded the versions first. Until dbt has built the store (first build)
the view is missing: `settle` then returns None and the next build brings the store up to
date.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.exceptions import DatabaseError

from loader.clients import Clients, clickhouse_call
from loader.cluster import insert_settings, rows_payload
from loader.errors import ActionableError
from loader.mapping import MappedBatch
from loader.schema import Table, mutation_target
from loader.steps import Steps

ANALYTICS_DB = "analytics"  # the dbt profile's schema (docs/ARCHITECTURE.md)
STORE = f"{ANALYTICS_DB}.pipeline_state_store"
RECOMPUTED_VIEW = f"{ANALYTICS_DB}.pipeline_state_recomputed"
# The store's names only (dbt creates it): on a cluster its deletes go to the local tables.
STORE_TABLE = Table(ANALYTICS_DB, "pipeline_state_store", (), "", "file_id")
STORE_COLUMNS = [
    "file_id",
    "rank",
    "stage",
    "employee_code",
    "employee_name",
    "status",
    "assigned_at",
    "task_id",
]
# What `pipeline_state_recomputed` returns, per row.
RECOMPUTED_COLUMNS = ["kind", *STORE_COLUMNS, "is_deleted", "_version"]
VERSION_BITS = (1 << 64) - 1  # the low 64 bits of a rank are its task's version
# Tasks per request: the arrays travel as URL parameters (128 KiB each on ClickHouse's side).
CHUNK = 2_000
# A parameterized view that does not exist is an unknown table function.
MISSING = ("UNKNOWN_TABLE", "UNKNOWN_DATABASE", "UNKNOWN_VIEW", "UNKNOWN_FUNCTION")


@dataclass
class RetractingTasks:
    """The tasks of stored batches whose events may retract a candidate (`follower`'s
    `_may_retract`), and the files their stored versions are in: the settle recomputes every
    file these tasks ever had a version in (`pipeline_state_members`) or are in now."""

    task_ids: set[str] = field(default_factory=set)
    file_ids: set[str] = field(default_factory=set)

    def add_batch(self, batch: MappedBatch, only: Container[str] | None = None) -> None:
        """The batch's tasks (`only`: these task ids alone)."""
        cols = batch.columns
        for task_id, file_id in zip(cols["_id"], cols["file_id"], strict=True):
            if only is None or task_id in only:
                self.task_ids.add(task_id)
                self.file_ids.add(file_id)

    def add_deleted(self, task_ids: Iterable[str]) -> None:
        self.task_ids.update(task_ids)

    def merge(self, later: RetractingTasks) -> None:
        self.task_ids |= later.task_ids
        self.file_ids |= later.file_ids

    def __len__(self) -> int:
        return len(self.task_ids) + len(self.file_ids)

    def params(self) -> Iterable[dict[str, list[str]]]:
        """The view's parameters, `CHUNK` ids of each kind per request."""
        tasks, files = sorted(self.task_ids), sorted(self.file_ids)
        for start in range(0, max(len(tasks), len(files)), CHUNK):
            yield {
                "task_ids": tasks[start : start + CHUNK],
                "file_ids": files[start : start + CHUNK],
            }


@dataclass(frozen=True)
class Settled:
    files: int  # files whose state changed
    steps: Steps = field(default_factory=Steps)  # ms per statement kind (the debug log line)


def _missing(exc: BaseException) -> bool:
    """The store or its views do not exist (rather than any other error in them)."""
    text = str(exc)
    names = (STORE, RECOMPUTED_VIEW, ANALYTICS_DB)
    return (
        isinstance(exc, DatabaseError)
        and any(code in text for code in MISSING)
        and any(name in text for name in names)
    )


def view_settings(clients: Clients) -> dict[str, Any]:
    """On a cluster the views filter the Distributed store and raw rows by a subquery on the
    Distributed members, which is sharded otherwise (by file, raw by task): run it once and
    ship its result to every shard (GLOBAL IN) rather than per shard against its own part."""
    return {"distributed_product_mode": "global"} if clients.settings.clickhouse_cluster else {}


# optimize_distinct_in_order reads the members of the view's `touched` in the table's order,
# which rules out their by_task projection: every member is read (1M rows at 1M tasks, EXPLAIN:
# 1000 of 1000 granules) instead of the given tasks' granules (353 of 1000 at 400 tasks). A
# SETTINGS clause in the view's text does not reach that read; the query's does.
RECOMPUTE_SETTINGS = {"optimize_distinct_in_order": 0}
# A micro-batch's few ids read a few granules per table, which one thread reads as fast, and a
# plan for one thread costs less (at 1M tasks: 59 instead of 63 ms of CPU, the cores left to the
# follower's next insert); a burst's thousands of ids get the engine's threads.
FEW_IDS = 100
FEW_IDS_SETTINGS = {"max_threads": 1}
# A view's text is read again after this many seconds (a new version of the dbt project may
# have replaced the view), and every time while the view is missing.
VIEW_TEXT_TTL_S = 30.0


@dataclass
class ViewTexts:
    """The SELECT of each view as dbt created it, read from `system.tables` and kept for
    `VIEW_TEXT_TTL_S` by whoever settles batch after batch (the follower's settling thread).

    The engine answers a parameterized view's SELECT run as a query with the same parameters
    faster than a call of the view (at 400 tasks, 105 to 145 ms against 150 to 290 ms for the
    stale check this project had before on the embedded stack; 82 against 100 ms for one file
    of `pipeline_state_recomputed` at 1M tasks): the call substitutes the arrays into the
    view's text wherever they occur before analysing it. Same SQL, same rows; dbt stays its
    only author."""

    ttl_s: float = VIEW_TEXT_TTL_S
    _read: dict[str, tuple[float, str]] = field(default_factory=dict)

    def get(self, clients: Clients, view: str) -> str | None:
        """The text of `view` (None: no such view yet)."""
        now = time.monotonic()
        cached = self._read.get(view)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        database, name = view.split(".")
        rows = _query(
            clients,
            "SELECT as_select FROM system.tables WHERE database = {d:String} AND name = {n:String}",
            d=database,
            n=name,
        )
        text = str(rows[0][0]) if rows and rows[0][0] else None
        if text is not None:
            self._read[view] = (now, text)
        return text


@dataclass(frozen=True)
class Recomputation:
    """Some files as raw says they should be, and what the store holds for them."""

    files: list[str]  # the files recomputed (the view's `touched`)
    best: dict[str, list[Any]]  # file -> its best row (STORE_COLUMNS); none without live tasks
    held: list[tuple[str, int]]  # (file, rank) of every row the store holds for the files
    superseded: set[tuple[str, int]]  # the held rows raw says are no longer candidates

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> Recomputation:
        """Judge the rows of `pipeline_state_recomputed` by the rules a build's settle applies
        in SQL: a file's best row is the top-ranked live current version in it
        (`pipeline_state_best_rows`); a held row is superseded when its task's current version
        is at least as new and differs from it: deleted, in another file or ranked otherwise
        (`pipeline_state_superseded`). A row of a version raw does not show yet (stored while
        the view read) is not superseded."""
        files: list[str] = []
        current: dict[str, dict[str, Any]] = {}
        held_rows: list[dict[str, Any]] = []
        for values in rows:
            named = dict(zip(RECOMPUTED_COLUMNS, values, strict=True))
            if named["kind"] == "touched":
                files.append(named["file_id"])
            elif named["kind"] == "current":
                current[named["task_id"]] = named
            else:
                held_rows.append(named)
        touched = set(files)
        best: dict[str, list[Any]] = {}
        for version in current.values():
            f = version["file_id"]
            if version["is_deleted"] or f not in touched:
                continue
            if f not in best or int(version["rank"]) > int(best[f][1]):
                best[f] = [version[name] for name in STORE_COLUMNS]
        held: list[tuple[str, int]] = []
        superseded: set[tuple[str, int]] = set()
        for row in held_rows:
            key = (row["file_id"], int(row["rank"]))
            held.append(key)
            now = current.get(row["task_id"])
            if (
                now is not None
                and int(now["_version"]) >= key[1] & VERSION_BITS
                and (now["is_deleted"] or now["file_id"] != key[0] or int(now["rank"]) != key[1])
            ):
                superseded.add(key)
        return cls(files, best, held, superseded)


def settle(
    clients: Clients, retracting: RetractingTasks, views: ViewTexts | None = None
) -> Settled | None:
    """Bring the store in line with the stored batches (see the module docstring): settle every
    file the `retracting` tasks ever had a version in or are in now. None when the store or its
    views do not exist yet (no dbt build so far): nothing to settle. `views`: the view texts
    kept from earlier settles (read afresh without)."""
    if not retracting:
        return Settled(0)
    views = views or ViewTexts()
    steps = Steps()
    changed = 0
    try:
        if views.get(clients, RECOMPUTED_VIEW) is None:
            return None
        for params in retracting.params():
            changed += _settle(clients, params, views, steps)[1]
    except DatabaseError as exc:
        if _missing(exc):
            return None
        raise
    return Settled(changed, steps)


def _query(
    clients: Clients, sql: str, settings: dict[str, Any] | None = None, **parameters: Any
) -> Sequence[Sequence[Any]]:
    ch = clients.clickhouse
    query_settings = {**view_settings(clients), **(settings or {})}
    return clickhouse_call(
        clients.settings,
        lambda: ch.query(sql, parameters=parameters, settings=query_settings).result_rows,
    )


def recompute(
    clients: Clients,
    views: ViewTexts,
    params: dict[str, list[str]],
    settings: dict[str, Any] | None = None,
) -> Recomputation:
    """`pipeline_state_recomputed` for `params` (`task_ids`, `file_ids`), judged."""
    view_sql = views.get(clients, RECOMPUTED_VIEW)
    if view_sql is None:
        raise _outdated_view("is missing")
    sql = f"SELECT {', '.join(RECOMPUTED_COLUMNS)} FROM ({view_sql})"
    few = sum(map(len, params.values())) <= FEW_IDS
    query_settings = {**RECOMPUTE_SETTINGS, **(FEW_IDS_SETTINGS if few else {}), **(settings or {})}
    try:
        rows = _query(clients, sql, query_settings, **params)
    except DatabaseError as exc:
        if "UNKNOWN_IDENTIFIER" in str(exc) or "UNKNOWN_QUERY_PARAMETER" in str(exc):
            raise _outdated_view("does not return what this loader reads") from exc
        raise
    return Recomputation.from_rows(rows)


def _outdated_view(what: str) -> ActionableError:
    return ActionableError(
        f"{RECOMPUTED_VIEW} {what}: it comes from another version of the dbt project than "
        "the loader's. Run a dbt build of this version (`make sync`, or `dbt run --select "
        "task_events`), which creates it again, then start the follower again.",
        "",
        kind="dbt",
        server="dbt",
    )


def settle_files(
    clients: Clients,
    files: list[str],
    *,
    after_insert: Callable[[], None] | None = None,
    after_delete: Callable[[], None] | None = None,
) -> int:
    """Make the store's row of each of `files` the best row recomputed from raw (none for a
    file without live tasks); returns the rows deleted. `after_insert`, `after_delete`: tests
    change the store there (a merge, a dropped row)."""
    if not files:
        return 0
    params = {"task_ids": [], "file_ids": files}
    return _settle(clients, params, ViewTexts(), Steps(), after_insert, after_delete)[0]


def _settle(
    clients: Clients,
    params: dict[str, list[str]],
    views: ViewTexts,
    steps: Steps,
    after_insert: Callable[[], None] | None = None,
    after_delete: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Make the store's row of each file the tasks `task_ids` ever had a version in, and of
    each of `file_ids`, the best row recomputed from raw (none for a file without live tasks);
    returns the rows deleted and the files changed. `macros/pipeline_state.sql`
    (`pipeline_state_settle_files`) does the same inside a dbt build.

    The best rows of the files whose state differs are inserted first, then the rows that
    outrank them and that raw supersedes are deleted (`pipeline_state_superseded`: a row of a
    version stored after the recomputation read raw stays), so a reader sees the old or the new
    state. Then the best rows of the files that lost a row are inserted once more: a
    ReplacingMergeTree merge keeps each file's top row, and one that began before the delete
    (it may end at any time after it, even after a read that found the best row in place) keeps
    the stale row, which the delete then hides, and drops the best row with the older version of
    it. A row inserted after the delete is in a part no such merge reads, and every later merge
    sees the delete."""
    ch = clients.clickhouse
    cluster = clients.settings.clickhouse_cluster
    with steps.time("recompute"):
        recomputed = recompute(clients, views, params)
    files, best, rows = recomputed.files, recomputed.best, recomputed.held
    superseded = recomputed.superseded
    rank = {f: int(row[1]) for f, row in best.items()}
    shown: dict[str, int] = {}  # what FINAL shows: the top row per file
    for f, file_rank in rows:
        shown[f] = max(file_rank, shown.get(f, 0))
    differing = [f for f in files if shown.get(f) != rank.get(f)]
    if not differing:
        return 0, 0

    def insert(which: list[str]) -> None:
        new = [best[f] for f in which if f in best]
        if not new:
            return
        # The same rows are inserted again on purpose (after the delete; a file falling back to
        # the same task as before): a nonce keeps a replicated store from taking them for a
        # retry of an earlier insert and dropping them. A retry of this call reuses it.
        payload = [*rows_payload(STORE_COLUMNS, new), os.urandom(16)]
        token = insert_settings(cluster, STORE, payload)
        with steps.time("insert"):
            clickhouse_call(
                clients.settings,
                lambda: ch.insert(STORE, new, column_names=STORE_COLUMNS, settings=token),
            )

    # A best row the store still holds (a retracted task's file falls back to a candidate it
    # kept) needs no new copy before the delete: the outranking rows go, and the insert after
    # the delete puts it back if a merge drops it, as it does for an inserted one.
    held = set(rows)
    insert([f for f in differing if f in best and (f, rank[f]) not in held])
    if after_insert is not None:  # tests force a merge here
        after_insert()
    # Only rows raw supersedes: a row that outranks the best without being superseded is a
    # version this recomputation did not see yet (stored meanwhile), and newer than it.
    wrong = set(differing)
    doomed = sorted({(f, r) for f, r in superseded if f in wrong and r > rank.get(f, 0)})
    if doomed:
        with steps.time("delete"):
            clickhouse_call(
                clients.settings,
                lambda: ch.command(
                    f"DELETE FROM {mutation_target(STORE_TABLE, cluster)} WHERE (file_id, rank) IN "
                    "{rows:Array(Tuple(String, UInt256))}",
                    parameters={"rows": doomed},
                    settings=clients.version().delete_settings(),
                ),
            )
    if after_delete is not None:  # tests drop a best row here, as such a merge does
        after_delete()
    # Only a file with a row deleted can lose its best row so: elsewhere nothing above the
    # best went, and a merge keeps the best or a newer version over it.
    insert(sorted({f for f, _ in doomed if f in best}))
    return len(doomed), len(differing)
