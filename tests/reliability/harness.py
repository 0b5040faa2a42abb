"""The reliability harness: exact comparison of MongoDB (the truth) with ClickHouse, and the
per-scenario results table.

`compare_raw` checks `raw.<collection>` deduplicated with FINAL (tombstones excluded) against
every document in MongoDB that the mapping contract accepts: same `_id`s, same field values,
no `_id` twice, no live row for a document that is gone from MongoDB. Documents the contract
refuses must be in `raw.rejects` with a reason. Which documents the contract accepts is decided
by the test-side classifier `mongo_oracle.contract_problems` (written from the rules in
docs/ARCHITECTURE.md), never by the loader's own mapper. `compare_task_events` and
`compare_pipeline_state` do the same for the dbt models, the latter against a naive
recomputation in Python (`argMax` by `(assigned_at, _id)` per `file_id` over MongoDB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client
from mongo_oracle import AS_STORED, FIELDS, contract_problems, contract_row, stored_id
from pymongo.database import Database

REPO = Path(__file__).resolve().parents[2]
DBT = Path(sys.executable).parent / "dbt"
# Details listed per comparison when something differs; the counts stay exact.
MAX_EXAMPLES = 5


@dataclass
class Comparison:
    """What one comparison found. `ok` only when every count of a problem is zero."""

    what: str
    checked: int = 0  # documents (or files) compared
    lost: int = 0  # in MongoDB, not in ClickHouse (nor in raw.rejects when refused)
    duplicates: int = 0  # an `_id` (or `file_id`) more than once
    mismatched: int = 0  # present on both sides with different values
    not_deleted: int = 0  # gone from MongoDB (or never there), still live in ClickHouse
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.mismatched or self.not_deleted)

    def note(self, text: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text)

    def match(
        self,
        expected: Mapping[str, tuple[Any, ...]],
        got: Mapping[str, tuple[Any, ...]],
        *,
        sides: tuple[str, str] = ("mongo", "clickhouse"),
        excused: Callable[[str], bool] = lambda key: False,
        extra: Callable[[str], str],
    ) -> None:
        """Count each expected key as checked, and as lost (unless `excused`) or mismatched;
        each key `got` has beyond `expected` as not deleted, noted as `extra(key)`."""
        for key, want in expected.items():
            self.checked += 1
            have = got.get(key)
            if have is None:
                if not excused(key):
                    self.lost += 1
                    self.note(f"lost {key}")
            elif have != want:
                self.mismatched += 1
                self.note(f"mismatch {key}: {sides[0]}={_short(want)} {sides[1]}={_short(have)}")
        for key in got.keys() - expected.keys():
            self.not_deleted += 1
            self.note(extra(key))

    def describe(self) -> str:
        head = (
            f"{self.what}: checked={self.checked} lost={self.lost} duplicates={self.duplicates} "
            f"mismatched={self.mismatched} not_deleted={self.not_deleted}"
        )
        return "\n".join([head, *(f"    {e}" for e in self.examples)])


@dataclass
class Truth:
    """MongoDB's side of one collection, judged by the mapping contract."""

    rows: dict[str, tuple[Any, ...]]  # hex _id -> field values (`FIELDS` order, dates in ms)
    refused: dict[str, str]  # _id as stored in raw.rejects -> the fields breaking the contract
    all_ids: set[str]  # every `_id` in MongoDB, as stored in ClickHouse


def read_truth(db: Database, collection: str, max_string_chars: int = 65_536) -> Truth:
    rows: dict[str, tuple[Any, ...]] = {}
    refused: dict[str, str] = {}
    all_ids: set[str] = set()
    coll = db.get_collection(collection, codec_options=AS_STORED)
    for doc in coll.find({}):
        key = stored_id(doc.get("_id"))
        all_ids.add(key)
        broken = contract_problems(doc, collection, max_string_chars)
        if broken:
            refused[key] = ", ".join(broken)
            continue
        rows[key] = contract_row(doc, collection)
    return Truth(rows, refused, all_ids)


def _ch_select(collection: str) -> str:
    return ", ".join(
        f"toUnixTimestamp64Milli(`{name}`)" if kind == "date" else f"`{name}`"
        for name, kind in FIELDS[collection].items()
    )


# Documents dated further ahead than LOADER_MAX_FUTURE_SECONDS (default one day) are held back
# by design; the comparison allows it for a document dated at least this far ahead of its clock
# (an hour less, since the loader judged them a little earlier).
HELD_BACK_AHEAD_MS = 86_400_000 - 3_600_000


def compare_raw(
    ch: Client, truth: Truth, collection: str, *, future_ok: bool = False
) -> Comparison:
    """`raw.<collection>` FINAL (live rows) against MongoDB; refused documents in raw.rejects.

    `future_ok`: documents dated too far ahead are held back by design (a reject that says so)."""
    updated_at = list(FIELDS[collection]).index("updated_at")
    held_back_after = int(time.time() * 1000) + HELD_BACK_AHEAD_MS
    out = Comparison(f"raw.{collection}")
    table = f"raw.{collection}"
    dup = ch.query(f"SELECT count() - uniqExact(_id) FROM {table} FINAL").result_rows[0][0]
    out.duplicates = int(dup)
    result = ch.query(
        f"SELECT _id, {_ch_select(collection)} FROM {table} FINAL WHERE is_deleted = 0"
    )
    live: dict[str, tuple[Any, ...]] = {}
    for row in result.result_rows:
        live[row[0]] = tuple(int(v) if isinstance(v, int) else v for v in row[1:])
    rejected = {
        r[0]: r[1]
        for r in ch.query(
            "SELECT _id, argMax(reason, rejected_at) FROM raw.rejects "
            "WHERE collection = {c:String} AND is_deleted = 0 GROUP BY _id",
            parameters={"c": collection},
        ).result_rows
    }

    def held_back(key: str) -> bool:
        return (
            future_ok
            and "ahead" in rejected.get(key, "")
            and truth.rows[key][updated_at] > held_back_after
        )

    def where(key: str) -> str:
        why = "refused now" if key in truth.refused else "gone from MongoDB"
        return f"live in ClickHouse, {why}: {key}"

    out.match(truth.rows, live, excused=held_back, extra=where)
    for key, broken in truth.refused.items():
        out.checked += 1
        if key not in rejected:
            out.lost += 1
            out.note(f"refused by the contract ({broken}) but not in raw.rejects: {key[:60]}")
            continue
        unnamed = [f for f in broken.split(", ") if f"{f}:" not in rejected[key]]
        if unnamed:  # the reason must name every broken rule
            out.mismatched += 1
            out.note(f"reject {key[:60]}: reason {rejected[key][:120]!r} does not name {unnamed}")
    return out


def compare_task_events(ch: Client, truth: Truth) -> Comparison:
    """analytics.task_events: one row per task ever loaded; live rows equal MongoDB's tasks."""
    out = Comparison("analytics.task_events")
    dup = ch.query("SELECT count() - uniqExact(task_id) FROM analytics.task_events")
    out.duplicates = int(dup.result_rows[0][0])
    result = ch.query(
        f"SELECT task_id, {_ch_select('tasks')} FROM analytics.task_events WHERE is_deleted = 0"
    )
    live = {r[0]: tuple(r[1:]) for r in result.result_rows}
    out.match(
        truth.rows,
        live,
        extra=lambda key: f"live in task_events, not a loadable task in MongoDB: {key}",
    )
    return out


def naive_pipeline_state(truth: Truth) -> dict[str, tuple[Any, ...]]:
    """file_id -> (stage, employee_code, status, assigned_at_ms, task_id) of the task with the
    highest (assigned_at, _id): the definition of the current state, computed from MongoDB."""
    at = {n: i for i, n in enumerate(FIELDS["tasks"])}
    best: dict[str, tuple[tuple[int, str], tuple[Any, ...]]] = {}
    for key, row in truth.rows.items():
        rank = (row[at["assigned_at"]], key)
        file_id = row[at["file_id"]]
        if file_id not in best or rank > best[file_id][0]:
            state = (
                row[at["stage"]],
                row[at["employee_code"]],
                row[at["status"]],
                row[at["assigned_at"]],
                key,
            )
            best[file_id] = (rank, state)
    return {f: s for f, (_, s) in best.items()}


def compare_pipeline_state(ch: Client, truth: Truth) -> Comparison:
    out = Comparison("analytics.pipeline_state")
    expected = naive_pipeline_state(truth)
    rows = ch.query(
        "SELECT file_id, stage, employee_code, status, toUnixTimestamp64Milli(assigned_at), "
        "task_id FROM analytics.pipeline_state"
    ).result_rows
    got: dict[str, tuple[Any, ...]] = {}
    for r in rows:
        if r[0] in got:
            out.duplicates += 1
            out.note(f"file twice: {r[0]}")
        got[r[0]] = tuple(r[1:])
    out.match(
        expected,
        got,
        sides=("naive", "pipeline_state"),
        extra=lambda key: f"file in pipeline_state without a live task in MongoDB: {key}",
    )
    return out


def sync_alone(comparison: Comparison) -> Comparison:
    """`comparison` taken right after a sync, before any reconcile: only deletes may differ
    (polling cannot see a deleted document); anything lost, changed or doubled is the sync's."""
    return replace(
        comparison,
        what=f"{comparison.what} after the sync alone (deletes excepted)",
        not_deleted=0,
        examples=[e for e in comparison.examples if not e.startswith("live in ClickHouse")],
    )


def reconcile_found_only_deletes(result: Any) -> Comparison:
    """A reconcile (`ReconcileResult`) right after a sync: it may tombstone deletes, but a
    document it had to load (missing, or stored with another `updated_at`) is one the sync
    should have loaded."""
    out = Comparison(
        f"reconcile of raw.{result.collection} after the sync",
        lost=result.missing_in_clickhouse,
        mismatched=result.stale_in_clickhouse,
    )
    if out.lost or out.mismatched:
        out.note(
            f"reconcile loaded {result.missing_in_clickhouse} missing and "
            f"{result.stale_in_clickhouse} stale documents that the sync did not"
        )
    return out


def _short(row: Iterable[Any]) -> str:
    return repr(tuple(row))[:160]


# -- dbt ------------------------------------------------------------------------------------------
def dbt_build(env: Mapping[str, str], workdir: Path, *, full_refresh: bool = False) -> None:
    """`dbt build` of the repo's project against the servers in `env` (a subprocess, so a
    private stack never meets the session's in-process dbt state). Raises with dbt's output."""
    workdir.mkdir(parents=True, exist_ok=True)
    profiles = workdir / "profiles.yml"
    if not profiles.exists():
        shutil.copy(REPO / "profiles.yml.example", profiles)
    cmd = [str(DBT), "build", "--project-dir", str(REPO), "--profiles-dir", str(workdir)]
    cmd += ["--target-path", str(workdir / "target"), "--log-path", str(workdir / "logs")]
    if full_refresh:
        cmd.append("--full-refresh")
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise AssertionError(f"dbt build failed ({proc.returncode}):\n{proc.stdout[-4000:]}")


# -- the results table ----------------------------------------------------------------------------
@dataclass
class ScenarioResult:
    scenario: str
    trials: int = 0
    passed: int = 0
    documents_checked: int = 0
    documents_lost: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    # Faults the scenario injected and saw land (a process killed, a server down while the
    # loader ran, runs overlapping); None for scenarios that inject none.
    faults_injected: int | None = None


@dataclass
class Report:
    """Trials of every scenario in this session, printed as a table at the end."""

    scenarios: dict[str, ScenarioResult] = field(default_factory=dict)

    def record(
        self,
        scenario: str,
        comparisons: Iterable[Comparison],
        seconds: float = 0.0,
        faults: int | None = None,
    ) -> bool:
        """One trial. `faults`: how many faults it injected and confirmed."""
        comps = list(comparisons)
        row = self.scenarios.setdefault(scenario, ScenarioResult(scenario))
        if faults is not None:
            row.faults_injected = (row.faults_injected or 0) + faults
        ok = all(c.ok for c in comps)
        row.trials += 1
        row.passed += int(ok)
        row.documents_checked += sum(c.checked for c in comps)
        row.documents_lost += sum(c.lost for c in comps)
        row.duplicates += sum(c.duplicates for c in comps)
        row.seconds += seconds
        return ok

    def record_check(self, scenario: str, ok: bool, checked: int = 0, seconds: float = 0.0) -> None:
        """A scenario whose verdict is not a document comparison (security checks)."""
        row = self.scenarios.setdefault(scenario, ScenarioResult(scenario))
        row.trials += 1
        row.passed += int(ok)
        row.documents_checked += checked
        row.seconds += seconds

    def table(self) -> str:
        head = (
            "scenario",
            "trials",
            "passed",
            "faults injected",
            "docs checked",
            "docs lost",
            "duplicates",
            "s",
        )
        rows = [
            (
                r.scenario,
                str(r.trials),
                str(r.passed),
                "-" if r.faults_injected is None else str(r.faults_injected),
                str(r.documents_checked),
                str(r.documents_lost),
                str(r.duplicates),
                f"{r.seconds:.0f}",
            )
            for r in self.scenarios.values()
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [line.format(*head), "  ".join("-" * w for w in widths)]
        out += [line.format(*r) for r in rows]
        return "\n".join(out)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "scenarios": [asdict(r) for r in self.scenarios.values()],
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")


def assert_all_ok(comparisons: Iterable[Comparison]) -> None:
    bad = [c for c in comparisons if not c.ok]
    if bad:
        raise AssertionError(
            "ClickHouse differs from MongoDB:\n" + "\n".join(c.describe() for c in bad)
        )
