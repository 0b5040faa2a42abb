"""`dbt build` of the models downstream of the changed sources, with per-node timings.

Runner choice: plain `dbtRunner` in-process, turning its run results into `StepTiming` rows
(-> `ops.step_timings` and the run's Prefect table artifact, so every node's timing is visible in
Prefect), instead of prefect-dbt's `PrefectDbtRunner`, which makes every dbt node a Prefect task
and pays API round trips per node: measured about 4-5x slower per build (`python -m
bench.runner_bench`; figures in docs/ARCHITECTURE.md, "Measurements behind design choices").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flows.settings import FlowSettings
from flows.timings import StepTiming

# Node statuses that fail a build; `warn` does not.
FAILED_STATUSES = {"error", "fail", "runtime error"}
# An error whose text matches this is the warehouse being unreachable, worth a retry; anything
# else (SQL errors, failed tests) fails at once.
TRANSIENT = re.compile(
    r"connection refused|connection reset|timed out|max retries exceeded|"
    r"name or service not known|failed to establish a new connection|remote end closed",
    re.IGNORECASE,
)


class DbtBuildError(RuntimeError):
    """dbt build failed; the message names every failed node with its warehouse error."""

    def __init__(
        self, message: str, failed: list[str] | None = None, nodes: list[StepTiming] | None = None
    ):
        super().__init__(message)
        self.failed = failed or []
        self.nodes = nodes or []  # timings of the nodes that did run, for the run's record


class DbtConnectionError(DbtBuildError):
    """dbt could not reach the warehouse: transient, retried with backoff."""


@dataclass(frozen=True)
class StoredFailures:
    """A data test that warned and stored its failing rows (`store_failures`): what
    `flows.data_quality` turns into alerts."""

    test: str  # the test node's name
    relation: str  # dbt's `relation_name`, quoted: `analytics_dbt_test__audit`.`<alias>`
    failures: int  # failing rows dbt counted


@dataclass
class BuildResult:
    select: list[str]
    nodes: list[StepTiming] = field(default_factory=list)
    # Warned data tests whose failing rows are in the warehouse (a `warn` does not fail a build).
    stored_failures: list[StoredFailures] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(n.rows for n in self.nodes)


def selectors(
    settings: FlowSettings, sources: Iterable[str], *, every_test: bool = True
) -> list[str]:
    """What to build downstream of the source tables that changed: `source:<source>.<table>+`
    (every model and data test), or with `every_test=False` the models and only the data tests
    that store their failures (`store_failures`: the documents `flows.data_quality` turns into
    alerts).

    Why the other tests are left to the runs that ask for every test (a full refresh,
    `build_all`, the daily reconcile run): each of them scans a whole model, whatever changed.
    At a million tasks they were two thirds of an incremental build's node time, which
    then cost half a full refresh (issue 12: `dbt.incremental_1pct` / `dbt.full_refresh`).
    They guard the models' logic (unique keys, not-null columns), which a change of data does
    not alter; a failure still surfaces within a day, in the run that reconciles."""
    tables = sorted(set(sources))
    if every_test:
        return [f"source:{settings.dbt_source}.{t}+" for t in tables]
    return [
        f"source:{settings.dbt_source}.{t}+,{kind}"
        for t in tables
        for kind in ("resource_type:model", "config.store_failures:true")
    ]


def dbt_args(
    settings: FlowSettings,
    command: str,
    select: list[str],
    dbt_vars: dict[str, Any] | None = None,
) -> list[str]:
    args = [command, "--project-dir", str(settings.dbt_project_dir)]
    if dbt_vars:
        # What the server lacks, switched off (`loader.server_version.ServerVersion.dbt_vars`).
        args += ["--vars", json.dumps(dbt_vars)]
    if select:
        args += ["--select", *select]
        if any("," in s for s in select):
            # An intersection names the tests it wants; dbt would add every test of the
            # selected models otherwise ("eager" indirect selection).
            args += ["--indirect-selection", "empty"]
    if settings.dbt_profiles_dir is not None:
        args += ["--profiles-dir", str(settings.dbt_profiles_dir)]
    if settings.dbt_target is not None:
        args += ["--target", settings.dbt_target]
    if settings.dbt_target_path is not None:
        args += ["--target-path", str(settings.dbt_target_path)]
        args += ["--log-path", str(Path(settings.dbt_target_path) / "logs")]
    return args


def _node_timing(result: Any) -> StepTiming:
    node = result.node
    status = str(getattr(result.status, "value", result.status))
    started = next((t.started_at for t in (result.timing or []) if t.started_at is not None), None)
    if started is None:
        started_at = datetime.now(UTC)
    else:  # dbt reports naive UTC
        started_at = started if started.tzinfo else started.replace(tzinfo=UTC)
    response = result.adapter_response or {}
    rows = response.get("rows_affected") or 0
    message = result.message or ""
    if status in FAILED_STATUSES:
        message = message or "failed"
    return StepTiming(
        step=f"dbt:{node.resource_type}:{node.name}",
        kind="dbt_node",
        status=status,
        started_at=started_at,
        ended_at=started_at + timedelta(seconds=result.execution_time or 0.0),
        duration_s=float(result.execution_time or 0.0),
        rows=int(rows) if isinstance(rows, int | float) and rows > 0 else 0,
        message=message if status in FAILED_STATUSES else "",
    )


def _stored_failures(result: Any) -> StoredFailures | None:
    """The stored-failures relation of a test that warned, if it stored its failures."""
    node = result.node
    status = str(getattr(result.status, "value", result.status))
    relation = getattr(node, "relation_name", None)
    if status != "warn" or f"{node.resource_type}" != "test" or not relation:
        return None
    return StoredFailures(test=node.name, relation=relation, failures=int(result.failures or 0))


def forget_ensured_databases() -> None:
    """dbt-clickhouse remembers per process which databases it has created and never checks
    again; a long-lived process (tests, an in-process serve) then fails with UNKNOWN_DATABASE
    after the target database is dropped. Forgetting costs one EXISTS query per build."""
    try:
        from dbt.adapters.clickhouse import dbclient
    except ImportError:  # another adapter: nothing cached
        return
    ensured = getattr(dbclient, "_ensured_databases", None)
    if isinstance(ensured, set):
        ensured.clear()


def run_build(
    settings: FlowSettings,
    select: list[str],
    full_refresh: bool = False,
    dbt_vars: dict[str, Any] | None = None,
) -> BuildResult:
    """Run `dbt build --select <select>` (`--full-refresh`: incremental models rebuilt from
    scratch; `dbt_vars`: passed as `--vars`); raise DbtBuildError naming the failed nodes."""
    from dbt.cli.main import dbtRunner

    forget_ensured_databases()
    # A fresh runner per build: dbtRunner instances are not meant to be reused concurrently.
    args = dbt_args(settings, "build", select, dbt_vars)
    args += ["--full-refresh"] if full_refresh else []
    res = dbtRunner().invoke(args)
    build = BuildResult(select=select)
    results = getattr(res.result, "results", None) or []
    build.nodes = [_node_timing(r) for r in results]
    build.stored_failures = [s for s in map(_stored_failures, results) if s is not None]

    if res.exception is not None:
        text = f"{type(res.exception).__name__}: {res.exception}"
        error = DbtConnectionError if TRANSIENT.search(text) else DbtBuildError
        raise error(f"dbt build could not run ({' '.join(select)}): {text}", nodes=build.nodes)
    failed = [n for n in build.nodes if n.status in FAILED_STATUSES]
    if failed:
        detail = "\n".join(
            f"- {n.step.split(':', 2)[2]} ({n.step.split(':')[1]}): {n.message}" for n in failed
        )
        names = [n.step.split(":", 2)[2] for n in failed]
        error = (
            DbtConnectionError
            if all(TRANSIENT.search(n.message) for n in failed)
            else DbtBuildError
        )
        hint = ""
        if any("UNKNOWN_TABLE" in n.message for n in failed):
            hint = (
                "\nA relation outside this selection is missing (was `analytics` dropped?): "
                "run the flow with build_all=True or `make dbt-build`."
            )
        raise error(
            f"dbt build failed in {', '.join(names)}:\n{detail}{hint}",
            failed=names,
            nodes=build.nodes,
        )
    if not res.success:
        raise DbtBuildError(
            f"dbt build reported failure ({' '.join(select)}) without node errors",
            nodes=build.nodes,
        )
    return build
