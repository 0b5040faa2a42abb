"""The Prefect flow `sync_pipeline`: guard -> detect changes -> load -> check drift -> dbt build.

Every run that holds the guard loads the collections that changed (a replaced collection counts
as changed and is reloaded from scratch, see `loader.identity`), then counts both sides of every
collection (`loader.drift`) and reconciles in the same run any collection whose counts differ
(every collection with `reconcile=True`). It then builds the dbt models downstream of every
source with a pending build (`loader.build_pending`: marked by any loader write, this run's or
not), with `--full-refresh` when a raw table was rebuilt, bumps the dashboard cache's data
version, raises alerts, and writes every step's timing to `ops.step_timings` and a Prefect table
artifact. With nothing pending the run is `skipped` (recorded in `ops.sync_runs`); its message
still says whether the warehouse is in step with MongoDB. The return value summarises the run.
"""

from __future__ import annotations

# ruff: noqa: E402 (the imports below come after the command line's early exit)
if __name__ == "__main__":
    # `python -m flows.pipeline`: decided before Prefect is imported, so that a run with
    # nothing to do takes well under a second (see flows/once.py).
    from flows.once import main

    main()
    raise SystemExit(0)

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import uuid4

from clickhouse_connect.driver.client import Client
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows import ops
from flows.alerts import (
    Alert,
    check_cache_hit_rate,
    check_drift,
    check_loader_memory,
    check_source_replaced,
    check_sync_duration,
    raise_alerts,
)
from flows.cache import QueryCache
from flows.dbt_build import BuildResult, DbtBuildError, DbtConnectionError, run_build, selectors
from flows.lock import run_guard
from flows.redis_link import RedisLink
from flows.settings import FlowSettings
from flows.timings import TimingRecorder
from loader.build_pending import PendingBuild, clear_build_pending, pending_builds
from loader.changes import has_changes
from loader.clients import Clients, open_clients
from loader.drift import Drift, measure_drift, record_drift
from loader.failed_runs import record_failed_start
from loader.identity import check_identity
from loader.reconcile import ReconcileResult, reconcile_collection
from loader.settings import Settings as LoaderSettings
from loader.shards import Shard
from loader.snapshot import load_range, never_loaded, plan_snapshot
from loader.snapshot_ranges import RangeSpec
from loader.sync import SyncResult, sync_collection


def is_transient(exc: BaseException | None) -> bool:
    """Connection-level failures are worth a retry; data and SQL errors are not."""
    if exc is None:
        return False
    if isinstance(exc, DbtConnectionError):
        return True
    if isinstance(exc, DbtBuildError):
        return False
    from clickhouse_connect.driver.exceptions import OperationalError

    from loader.clients import MONGO_TRANSIENT, ServerUnavailable

    transient: tuple[type[BaseException], ...] = (
        ConnectionError,
        TimeoutError,
        *MONGO_TRANSIENT,
        OperationalError,
        ServerUnavailable,  # the loader's own retries ran out; one more try after a pause
    )
    return isinstance(exc, transient) or is_transient(exc.__cause__)


def _retry_on_transient(task_: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # the state's exception, re-raised to inspect it
            exc = raised
    return is_transient(exc)


def _task_options(settings: FlowSettings) -> dict[str, Any]:
    return {
        "retries": settings.task_retries,
        "retry_delay_seconds": exponential_backoff(settings.task_retry_delay_seconds),
        "retry_condition_fn": _retry_on_transient,
    }


@task(name="detect-changes", cache_policy=NO_CACHE)
def detect_changes(clients: Clients, collections: list[str], shards: int = 1) -> list[str]:
    return [
        c for c in collections if has_changes(clients.settings, c, clients=clients, shards=shards)
    ]


@task(name="load-collection", task_run_name="load-{collection}", cache_policy=NO_CACHE)
def load_collection(clients: Clients, collection: str, full_refresh: bool = False) -> SyncResult:
    return sync_collection(clients.settings, collection, full_refresh=full_refresh, clients=clients)


@task(name="load-shard", task_run_name="load-{collection}-{shard}", cache_policy=NO_CACHE)
def load_shard(clients: Clients, collection: str, shard: Shard) -> SyncResult:
    return sync_collection(clients.settings, collection, clients=clients, shard=shard)


@task(name="load-range", task_run_name="load-{collection}-snapshot-{spec}", cache_policy=NO_CACHE)
def load_snapshot_range(clients: Clients, collection: str, spec: RangeSpec) -> SyncResult:
    return load_range(clients.settings, collection, spec, clients=clients)


def _load(
    clients: Clients, collection: str, full_refresh: bool, shards: int, options: dict[str, Any]
) -> list[SyncResult]:
    """One load task, or `shards` mapped ones running at once. A full refresh or a replaced
    collection empties the table for every shard, so it stays one unsharded task. A collection
    never loaded is split by `_id` range instead of hash (`loader.snapshot`): each task then
    scans only its part of the collection."""
    if shards == 1 or full_refresh or check_identity(clients, collection).replaced:
        return [load_collection.with_options(**options)(clients, collection, full_refresh)]
    if never_loaded(clients, collection):
        plan_snapshot(clients.settings, collection, shards, clients=clients)
        ranges = load_snapshot_range.with_options(**options).map(
            unmapped(clients), collection, [RangeSpec(k, shards) for k in range(shards)]
        )
        return list(ranges.result())
    futures = load_shard.with_options(**options).map(
        unmapped(clients), collection, [Shard(i, shards) for i in range(shards)]
    )
    return list(futures.result())


@task(name="reconcile", task_run_name="reconcile-{collection}", cache_policy=NO_CACHE)
def reconcile_collection_task(clients: Clients, collection: str) -> ReconcileResult:
    return reconcile_collection(clients.settings, collection, clients=clients)


@task(name="check-drift", task_run_name="check-drift-{collection}", cache_policy=NO_CACHE)
def check_drift_task(clients: Clients, collection: str) -> Drift:
    return measure_drift(clients, collection)


@task(name="dbt-build", cache_policy=NO_CACHE)
def dbt_build(
    settings: FlowSettings, clients: Clients, select: list[str], full_refresh: bool = False
) -> BuildResult:
    # The models switch off what this ClickHouse lacks (patch-part deletes before 25.7).
    return run_build(settings, select, full_refresh, clients.version().dbt_vars())


def _summary(
    run_id: str,
    status: str,
    message: str,
    recorder: TimingRecorder,
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "status": status,
        "message": message,
        "duration_s": round(time.perf_counter() - started, 3),
        "steps": recorder.table(),
        **extra,
    }


@flow(name="sync-pipeline", log_prints=True)
def sync_pipeline(
    full_refresh: bool = False, build_all: bool = False, reconcile: bool = False
) -> dict[str, Any]:
    """Bring ClickHouse in step with MongoDB once; see the module docstring.

    `full_refresh`: reload every collection from scratch and rebuild every model.
    `build_all`: build downstream of every source even if only one changed (e.g. after the
    `analytics` database was dropped by hand).
    `reconcile`: compare every collection with MongoDB id by id, even when the counts agree,
    and repair what the watermark read cannot see (late writes, backward updates); the
    scheduled deployment does this every `PIPELINE_RECONCILE_INTERVAL_MINUTES`."""
    settings = FlowSettings()
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or uuid4())
    t0 = time.perf_counter()
    started_at = ops.now()
    recorder = TimingRecorder(run_id)
    link = RedisLink(settings, logger)
    ch = ops.connect(settings)
    try:
        _ensure_schema(ch)
        with ExitStack() as held:
            with recorder.step("guard") as step:  # times the acquisition only
                g = held.enter_context(run_guard(settings, link, run_id, logger))
                step.message = g.mechanism
                if not g.acquired:
                    step.status = "skipped"
                    step.message = g.skip_message
            if not g.acquired:
                logger.info("Run %s %s", run_id, g.skip_message)
                ops.record_skipped_run(ch, run_id, settings.collections, started_at, g.skip_message)
                return _summary(run_id, "skipped", g.skip_message, recorder, t0, guard=g.mechanism)
            run = RunContext(settings, logger, run_id, started_at, t0, recorder, link, ch, held)
            return {**_run(run, full_refresh, build_all, reconcile), "guard": g.mechanism}
    except Exception as exc:
        # MongoDB failed before any load started (connect, change probe): still a failed sync
        # of every collection in ops.sync_runs, and the error says no watermark moved.
        if not any(s.step.startswith("load:") for s in recorder.steps):
            record_failed_start(ch, settings.collections, exc, run_id=run_id)
        raise
    finally:
        _publish(recorder, ch, logger)
        QueryCache(settings, link).bump_runs()  # run history changed: pages refresh it
        link.close()
        ch.close()


@dataclass
class RunContext:
    settings: FlowSettings
    logger: logging.Logger | logging.LoggerAdapter
    run_id: str
    started_at: datetime
    t0: float  # perf_counter at the start, for durations
    recorder: TimingRecorder
    link: RedisLink
    ch: Client
    held: ExitStack  # closes what the run opens, when the run ends


def _run(run: RunContext, full_refresh: bool, build_all: bool, reconcile: bool) -> dict[str, Any]:
    settings, logger, run_id, recorder, ch = (
        run.settings,
        run.logger,
        run.run_id,
        run.recorder,
        run.ch,
    )
    collections = list(settings.collections)
    options = _task_options(settings)

    # One pair of pooled connections serves every loader step of the run.
    clients = run.held.enter_context(open_clients(LoaderSettings()))
    with recorder.step("detect_changes") as step:
        if full_refresh:
            changed = collections
        else:
            changed = detect_changes.with_options(**options)(
                clients, collections, settings.loader_shards
            )
        step.rows = len(changed)
        step.message = f"changed={changed}"

    alerts: list[Alert | None] = []
    loads: dict[str, dict[str, Any]] = {}
    for collection in changed:
        with recorder.step(f"load:{collection}") as step:
            results = _load(clients, collection, full_refresh, settings.loader_shards, options)
            docs_read = sum(r.docs_read for r in results)
            rows_written = sum(r.rows_written for r in results)
            rejects = sum(r.rejects for r in results)
            deletes = sum(r.deletes for r in results)
            step.rows = rows_written
            step.message = f"docs_read={docs_read} rejects={rejects} deletes={deletes}"
            if len(results) > 1:
                step.message += f" shards={len(results)}"
        peak_rss = max(r.peak_rss_bytes for r in results)
        replaced = next((r.source_replaced for r in results if r.source_replaced), "")
        loads[collection] = {
            "status": results[0].status,
            "docs_read": docs_read,
            "rows_written": rows_written,
            "rejects": rejects,
            "deletes": deletes,
            "peak_rss_bytes": peak_rss,
            "loader_run_id": ",".join(r.run_id for r in results),
            "source_replaced": replaced,
        }
        alerts.append(check_loader_memory(settings, run_id, collection, peak_rss))
        alerts.append(check_source_replaced(run_id, collection, replaced))

    drifts, repairs = _check_drift(run, clients, options, reconcile_all=reconcile)
    alerts.extend(check_drift(run_id, d) for d in drifts.values())
    in_step = _describe_drift(drifts)

    # Every loader write (this run's, a CLI run's, the change follower's) marked its source.
    pending = pending_builds(ch, collections)
    if build_all:
        pending = {c: pending.get(c, PendingBuild(c, False, None)) for c in collections}
    if not pending:
        message = f"skipped: no changes since the last sync; {in_step}"
        for timing in recorder.steps:
            if timing.step == "detect_changes":
                timing.status = "skipped"
        logger.info("Run %s %s", run_id, message)
        ops.record_skipped_run(ch, run_id, collections, run.started_at, message)
        raise_alerts(settings, ch, alerts, logger)
        return _summary(
            run_id, "skipped", message, recorder, run.t0, changed=[], built=[], in_step=in_step
        )

    to_build = sorted(pending)
    rebuild = any(p.full_refresh for p in pending.values())
    # Every data test when the models are rebuilt or the run asked for everything; otherwise
    # the models and the tests that raise data-quality alerts (see `selectors`). The summary
    # names what was built downstream of; the step's message the exact selection.
    built = selectors(settings, to_build)
    select = selectors(settings, to_build, every_test=rebuild or build_all or reconcile)
    build_started_at = ops.now()
    with recorder.step("dbt_build") as step:
        step.message = " ".join(select) + (" --full-refresh" if rebuild else "")
        try:
            build = dbt_build.with_options(**options)(settings, clients, select, rebuild)
        except DbtBuildError as exc:
            for node in exc.nodes:
                recorder.add(node)
            logger.error(
                "dbt build failed; the loaded data and its watermark stay valid and the next "
                "run retries the build of %s.\n%s",
                ", ".join(to_build),
                exc,
            )
            raise
        step.rows = build.rows
        for node in build.nodes:
            recorder.add(node)
    clear_build_pending(ch, to_build, run_id, build_started_at=build_started_at)

    cache = QueryCache(settings, run.link)
    version = cache.bump_version()
    elapsed = time.perf_counter() - run.t0
    alerts.append(check_sync_duration(settings, run_id, elapsed))
    alerts.append(check_cache_hit_rate(settings, run_id, cache.take_stats()))
    # Documents that flowed on with an unknown value or reference, named by the warned tests.
    from flows.data_quality import stored_failure_alerts

    alerts.extend(stored_failure_alerts(ch, build.stored_failures, run_id))
    raised = raise_alerts(settings, ch, alerts, logger)
    message = f"loaded {', '.join(changed) or 'nothing'}; built {' '.join(built)}; {in_step}"
    logger.info("Run %s: %s in %.2f s", run_id, message, elapsed)
    return _summary(
        run_id,
        "ok",
        message,
        recorder,
        run.t0,
        changed=changed,
        built=built,
        full_refresh=rebuild,
        loads=loads,
        data_version=version,
        in_step=in_step,
        drift={c: _drift_summary(d) for c, d in drifts.items()},
        repairs=repairs,
        alerts=[a.message for a in raised],
    )


def _check_drift(
    run: RunContext, clients: Clients, options: dict[str, Any], *, reconcile_all: bool
) -> tuple[dict[str, Drift], dict[str, dict[str, int]]]:
    """Count both sides of every collection; reconcile the ones that differ (every one with
    `reconcile_all`) in this run, then count again. Each final count is recorded. Returns the
    final counts and what each reconcile repaired."""
    drifts: dict[str, Drift] = {}
    repairs: dict[str, dict[str, int]] = {}
    with run.recorder.step("check_drift") as step:
        notes = []
        for collection in run.settings.collections:
            drift = None if reconcile_all else check_drift_task(clients, collection)
            note = ""
            if drift is None or not drift.in_step:
                before = "" if drift is None else f"{drift.differ} differed; "
                result = reconcile_collection_task.with_options(**options)(clients, collection)
                note = f"{before}reconciled: {_describe_repair(result)}"
                repairs[collection] = {
                    "tombstones": result.deletes,
                    "rows_loaded": result.rows_written,
                    "rejects": result.rejects,
                }
                notes.append(f"{collection}: {note}")
                drift = check_drift_task(clients, collection)
            record_drift(clients, drift, run.run_id, note)
            drifts[collection] = drift
        step.rows = sum(d.differ for d in drifts.values())
        step.message = "; ".join([d.describe() for d in drifts.values()] + notes)
    return drifts, repairs


def _describe_repair(result: ReconcileResult) -> str:
    return (
        f"{result.deletes} tombstones, {result.rows_written} rows loaded, {result.rejects} "
        f"rejects, {result.rejected_gone} rejected documents gone"
    )


def _describe_drift(drifts: dict[str, Drift]) -> str:
    """ "in step with MongoDB as of <time>", or what differs."""
    apart = [d.describe() for d in drifts.values() if not d.in_step]
    if apart:
        return "; ".join(apart)
    checked = min(d.checked_at for d in drifts.values())
    return f"in step with MongoDB as of {checked:%Y-%m-%d %H:%M:%S} UTC"


def _drift_summary(drift: Drift) -> dict[str, Any]:
    return {
        "mongo_count": drift.mongo_count,
        "clickhouse_count": drift.clickhouse_count,
        "differ": drift.differ,
        "checked_at": drift.checked_at.isoformat(),
    }


def _ensure_schema(ch: Client) -> None:
    """The loader's tables (ops.sync_runs receives skipped runs) and the flow's own."""
    from loader.schema import ensure_schema

    ensure_schema(ch)
    ops.ensure_tables(ch)


def _publish(
    recorder: TimingRecorder, ch: Client, logger: logging.Logger | logging.LoggerAdapter
) -> None:
    """Write the timings and the artifact, even for a failed run; never mask the run's error."""
    try:
        recorder.write(ch)
    except Exception as exc:
        logger.error("Could not write ops.step_timings: %s", exc)
    try:
        recorder.publish_artifact()
    except Exception as exc:
        logger.error("Could not create the timings artifact: %s", exc)
