"""The Prefect flow `sync_pipeline`: guard -> detect changes -> load -> dbt build -> timings.

A run does nothing (and records a `skipped` run in `ops.sync_runs`) when another run holds the
guard, or when no collection changed and no earlier build is still pending. Otherwise it loads the
changed collections, builds the dbt models downstream of the changed (or still pending) sources,
bumps the dashboard cache's data version, checks the alert thresholds, and writes every step's
timing to `ops.step_timings` and a Prefect table artifact. The return value summarises the run.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import uuid4

from clickhouse_connect.driver.client import Client
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows import ops
from flows.alerts import (
    Alert,
    check_cache_hit_rate,
    check_loader_memory,
    check_sync_duration,
    raise_alerts,
)
from flows.cache import QueryCache
from flows.dbt_build import BuildResult, DbtBuildError, DbtConnectionError, run_build, selectors
from flows.lock import run_guard
from flows.redis_link import RedisLink
from flows.settings import FlowSettings
from flows.timings import TimingRecorder
from loader import errors
from loader.clients import Clients, open_clients
from loader.failed_runs import record_failed_start
from loader.reconcile import ReconcileResult, reconcile_collection
from loader.settings import Settings as LoaderSettings
from loader.sync import SyncResult, has_changes, sync_collection


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
def detect_changes(clients: Clients, collections: list[str]) -> list[str]:
    return [c for c in collections if has_changes(clients.settings, c, clients=clients)]


@task(name="load-collection", task_run_name="load-{collection}", cache_policy=NO_CACHE)
def load_collection(clients: Clients, collection: str, full_refresh: bool = False) -> SyncResult:
    return sync_collection(clients.settings, collection, full_refresh=full_refresh, clients=clients)


@task(name="reconcile", task_run_name="reconcile-{collection}", cache_policy=NO_CACHE)
def reconcile_collection_task(clients: Clients, collection: str) -> ReconcileResult:
    return reconcile_collection(clients.settings, collection, clients=clients)


@task(name="dbt-build", cache_policy=NO_CACHE)
def dbt_build(settings: FlowSettings, select: list[str]) -> BuildResult:
    return run_build(settings, select)


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

    `full_refresh`: reload every collection from scratch (and build everything).
    `build_all`: build downstream of every source even if only one changed (e.g. after the
    `analytics` database was dropped by hand).
    `reconcile`: also compare every collection with MongoDB and repair what the watermark read
    cannot see (deletes, late writes, backward updates); the scheduled deployment does this
    every `PIPELINE_RECONCILE_INTERVAL_MINUTES`."""
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
    started_at, t0, link = run.started_at, run.t0, run.link
    collections = list(settings.collections)
    options = _task_options(settings)

    # One pair of pooled connections serves every loader step of the run.
    clients = run.held.enter_context(open_clients(LoaderSettings()))
    with recorder.step("detect_changes") as step:
        if full_refresh:
            changed = collections
        else:
            changed = detect_changes.with_options(**options)(clients, collections)
        pending = set(collections) if build_all else ops.pending_sources(ch, collections)
        step.rows = len(changed)
        step.message = f"changed={changed} pending_build={sorted(pending)}"
    if not (changed or pending or reconcile):
        message = "skipped: no changes since the last sync"
        recorder.steps[-1].status = "skipped"
        logger.info("Run %s %s", run_id, message)
        ops.record_skipped_run(ch, run_id, collections, started_at, message)
        return _summary(run_id, "skipped", message, recorder, t0, changed=[], built=[])

    # Durable before loading: if this run dies after the load, the next run still builds.
    ops.set_pending(ch, changed, True, run_id)
    alerts: list[Alert | None] = []
    loads: dict[str, dict[str, Any]] = {}
    for collection in changed:
        with recorder.step(f"load:{collection}") as step:
            result = load_collection.with_options(**options)(clients, collection, full_refresh)
            step.rows = int(result.rows_written)
            step.message = (
                f"docs_read={result.docs_read} rejects={result.rejects} deletes={result.deletes}"
            )
        loads[collection] = {
            "status": result.status,
            "docs_read": result.docs_read,
            "rows_written": result.rows_written,
            "rejects": result.rejects,
            "deletes": result.deletes,
            "peak_rss_bytes": result.peak_rss_bytes,
            "loader_run_id": result.run_id,
        }
        alerts.append(check_loader_memory(settings, run_id, collection, result.peak_rss_bytes))

    repaired = _reconcile(run, clients, pending | set(changed), options) if reconcile else []
    to_build = sorted(set(changed) | pending | set(repaired))
    if not to_build:
        message = "reconciled: nothing to repair, nothing changed"
        logger.info("Run %s %s", run_id, message)
        return _summary(run_id, "ok", message, recorder, t0, changed=[], built=[])
    select = selectors(settings, to_build)
    with recorder.step("dbt_build") as step:
        step.message = " ".join(select)
        try:
            build = dbt_build.with_options(**options)(settings, select)
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
    ops.set_pending(ch, to_build, False, run_id)

    cache = QueryCache(settings, link)
    version = cache.bump_version()
    elapsed = time.perf_counter() - t0
    alerts.append(check_sync_duration(settings, run_id, elapsed))
    alerts.append(check_cache_hit_rate(settings, run_id, cache.take_stats()))
    raised = raise_alerts(settings, ch, alerts, logger)
    message = f"loaded {', '.join(changed) or 'nothing'}; built {' '.join(select)}"
    logger.info("Run %s: %s in %.2f s", run_id, message, elapsed)
    return _summary(
        run_id,
        "ok",
        message,
        recorder,
        t0,
        changed=changed,
        built=select,
        loads=loads,
        data_version=version,
        alerts=[a.message for a in raised],
    )


def _reconcile(
    run: RunContext, clients: Clients, pending: set[str], options: dict[str, Any]
) -> list[str]:
    """Reconcile every collection; the ones it repaired need a build (as do `pending`)."""
    collections = list(run.settings.collections)
    with run.recorder.step("reconcile") as step:
        # Durable before repairing: if the run dies mid-way, the next run still builds.
        ops.set_pending(run.ch, collections, True, run.run_id)
        results = [
            reconcile_collection_task.with_options(**options)(clients, c) for c in collections
        ]
        repaired = [r.collection for r in results if r.deletes or r.rows_written or r.rejects]
        untouched = [c for c in collections if c not in repaired and c not in pending]
        ops.set_pending(run.ch, untouched, False, run.run_id)
        step.rows = sum(r.deletes + r.rows_written + r.rejects for r in results)
        step.message = "; ".join(
            f"{r.collection}: {r.deletes} tombstones, {r.rows_written} rows, {r.rejects} rejects"
            for r in results
        )
    return repaired


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


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.pipeline` (`make sync`): one run; prints its summary as JSON."""
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description=main.__doc__, epilog=errors.CLI_HELP
    )
    parser.add_argument("--full-refresh", action="store_true", help="reload every collection")
    parser.add_argument("--build-all", action="store_true", help="build downstream of all sources")
    parser.add_argument(
        "--reconcile", action="store_true", help="also repair deletes and missed writes"
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="on failure, print the traceback too"
    )
    args = parser.parse_args(argv)
    errors.quiet_driver_logs(args.verbose)
    # An ephemeral Prefect API (no PREFECT_API_URL) would otherwise log telemetry errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    def run() -> None:
        # A bad setting fails here, before a flow run starts.
        FlowSettings()
        LoaderSettings()
        # Prefect logs the failure with its traceback; the console gets the line only.
        with errors.console_logs_without_tracebacks(not args.verbose):
            summary = sync_pipeline(
                full_refresh=args.full_refresh, build_all=args.build_all, reconcile=args.reconcile
            )
        print(json.dumps(summary, indent=2, default=str))

    errors.run_cli(run, verbose=args.verbose)


if __name__ == "__main__":
    main()
