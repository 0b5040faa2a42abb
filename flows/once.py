"""`python -m flows.pipeline` (`make sync`): one run of the pipeline, with Prefect only if needed.

Most scheduled runs find nothing to do, and Prefect is the expensive part of finding that out:
importing it takes about 2 s and a temporary API (no `PREFECT_API_URL`) many more. So before
Prefect starts, `skip_if_idle` asks the questions the flow's first steps ask, on the connections
the run opens anyway (a server that does not answer fails there, recorded as each collection's
failed sync):

1. guard: the Redis lock, taken without waiting (held by another run: the run is skipped, as the
   flow skips it);
2. detect_changes: does any collection have documents past its watermark, a replaced source,
   or, inside the overlap window, documents that differ from raw (`loader.changes`)?
3. is a dbt build pending for any source (`ops.build_pending`, marked by every loader write)?
4. check_drift: do both sides count the same documents? MongoDB's side from the collection's
   document count, which needs no scan; ClickHouse's from the last count, kept in Redis, while
   the raw table's parts are unchanged (`loader.raw_count`); an exact count of both confirms
   any disagreement before the flow is started.

When every answer is "nothing to do", the run is recorded exactly as the flow records a skipped
run (`ops.sync_runs`: a `skipped` row per collection, whose message ends with `in step with
MongoDB as of <time>`; `ops.drift_checks`; `ops.step_timings`) and its summary printed; Prefect is
never imported. Any other answer, Redis unreachable (the guard then needs Prefect's concurrency
limit), an error in these checks, or `--full-refresh` / `--build-all` / `--reconcile` hands the
run to the flow `flows.pipeline.sync_pipeline`, which checks everything again under its own guard.
A served deployment (`make serve`) calls the flow directly and keeps its server.

This module must not import Prefect at module level (a test checks a no-op run without it).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from uuid import uuid4

from flows import ops
from flows.cache import QueryCache
from flows.lock import Guard
from flows.redis_link import REDIS_ERRORS, RedisLink
from flows.settings import FlowSettings
from flows.summary import short_summary
from flows.timings import TimingRecorder
from loader import errors
from loader.clients import Clients

log = logging.getLogger(__name__)


def skip_if_idle(settings: FlowSettings, clients: Clients) -> dict[str, Any] | None:
    """Record a run with nothing to do, without Prefect; its summary (the flow's keys for a
    skipped run, plus `prefect: False`), or None when the run needs the flow."""
    from loader.build_pending import pending_builds
    from loader.changes import has_changes
    from loader.drift import record_drift, start_counts

    run_id = str(uuid4())
    t0 = time.perf_counter()
    started_at = ops.now()
    recorder = TimingRecorder(run_id)
    ch = clients.clickhouse
    collections = list(settings.collections)
    link = RedisLink(settings, log)
    try:
        client = link.client()
        if client is None:
            return None  # the flow guards with Prefect's concurrency limit
        key = settings.key("lock", "sync")
        lock = client.lock(key, timeout=settings.lock_ttl_seconds, thread_local=False)
        with recorder.step("guard") as step:
            step.message = "redis"
            try:
                acquired = lock.acquire(blocking=False, token=run_id)
            except REDIS_ERRORS:
                return None
            if not acquired:
                guard = Guard(False, "redis", link.call(lambda c: str(c.get(key) or ""), ""))
                step.status, step.message = "skipped", guard.skip_message
        counts = None
        try:
            if acquired:
                # MongoDB's counts run meanwhile: from the collection's document count, since
                # an exact count takes half a second at a million documents; a disagreement is
                # confirmed by an exact count below before the flow is started.
                # ClickHouse's side is remembered in Redis while the raw table is unchanged.
                memo = _RedisMemo(client, settings)
                counts = start_counts(clients, collections, estimate=True, memo=memo)
            _ensure_schema(clients)
            if not acquired:
                message = guard.skip_message
                summary = _skipped(recorder, ch, collections, started_at, t0, message, {})
                QueryCache(settings, link).bump_runs()  # run history changed: pages refresh it
                return summary
            with recorder.step("detect_changes") as step:
                changed = [
                    c for c in collections if has_changes(clients.settings, c, clients=clients)
                ]
                step.message = f"changed={changed}"
            if changed or pending_builds(ch, collections):
                return None
            with recorder.step("check_drift") as step:
                assert counts is not None
                drifts = counts.result()
                if not all(d.in_step for d in drifts):
                    drifts = start_counts(clients, collections).result()
                step.rows = sum(d.differ for d in drifts)
                step.message = "; ".join(d.describe() for d in drifts)
            if not all(d.in_step for d in drifts):
                return None  # the flow reconciles what differs
            step_detect = next(s for s in recorder.steps if s.step == "detect_changes")
            step_detect.status = "skipped"
            for drift in drifts:
                record_drift(clients, drift, run_id)
            checked = min(d.checked_at for d in drifts)
            in_step = f"in step with MongoDB as of {checked:%Y-%m-%d %H:%M:%S} UTC"
            message = f"skipped: no changes since the last sync; {in_step}"
            extra = {"changed": [], "built": [], "in_step": in_step}
            summary = _skipped(recorder, ch, collections, started_at, t0, message, extra)
            QueryCache(settings, link).bump_runs()
            return summary
        finally:
            if counts is not None:
                counts.cancel()
            if acquired:
                try:
                    lock.release()
                except Exception as exc:  # noqa: BLE001 - expired or Redis gone: the TTL frees it
                    log.warning("Could not release the Redis lock %s: %s", key, exc)
    except Exception as exc:  # noqa: BLE001 - the flow runs the same checks and reports it
        log.debug("preflight could not decide (%s); running the flow", exc)
        return None
    finally:
        link.close()


class _RedisMemo:
    """`loader.raw_count.CountMemo` in Redis: the last count of each raw table, for a day."""

    def __init__(self, client: Any, settings: FlowSettings) -> None:
        self.client = client
        self.settings = settings

    def get(self, collection: str) -> str | None:
        value = self.client.get(self.settings.key("drift", "raw_count", collection))
        return value.decode() if isinstance(value, bytes) else value

    def set(self, collection: str, value: str) -> None:
        self.client.set(self.settings.key("drift", "raw_count", collection), value, ex=86_400)


def _ensure_schema(clients: Clients) -> None:
    from loader.sync import prepare_clients

    prepare_clients(clients)  # the loader's tables (ops.sync_runs, ops.drift_checks)
    ops.ensure_tables(clients.clickhouse)  # the flow's (ops.step_timings)


def _skipped(
    recorder: TimingRecorder,
    ch: Any,
    collections: list[str],
    started_at: Any,
    t0: float,
    message: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    ops.record_skipped_run(ch, recorder.run_id, collections, started_at, message)
    recorder.write(ch)
    return {
        "run_id": recorder.run_id,
        "status": "skipped",
        "message": message,
        "duration_s": round(time.perf_counter() - t0, 3),
        "steps": recorder.table(),
        **extra,
        "guard": "redis",
        "prefect": False,
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.pipeline` (`make sync`): one run; prints a short summary (`--json`: the
    whole one). A run with nothing to do is recorded without starting Prefect."""
    import argparse
    import json
    import os
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description=main.__doc__, epilog=errors.CLI_HELP
    )
    parser.add_argument("--full-refresh", action="store_true", help="reload every collection")
    parser.add_argument("--build-all", action="store_true", help="build downstream of all sources")
    parser.add_argument(
        "--reconcile", action="store_true", help="also repair deletes and missed writes"
    )
    parser.add_argument("--json", action="store_true", help="print the whole run summary as JSON")
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show Prefect's and dbt's progress, and on failure the traceback",
    )
    args = parser.parse_args(argv)
    errors.quiet_driver_logs(args.verbose)
    # An ephemeral Prefect API (no PREFECT_API_URL) would otherwise log telemetry errors, and
    # dbt would try to send usage statistics (no network here).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")

    def run() -> None:
        from loader.failed_runs import sync_clients
        from loader.settings import Settings as LoaderSettings

        # A bad setting, or a server that does not answer or refuses the credentials, fails
        # here within seconds, before Prefect starts (a temporary API takes longer than that);
        # a MongoDB failure is still recorded as each collection's failed sync.
        settings = FlowSettings()
        summary = None
        with sync_clients(LoaderSettings(), settings.collections) as clients:
            if not (args.full_refresh or args.build_all or args.reconcile):
                summary = skip_if_idle(settings, clients)
        if summary is None:
            from flows.pipeline import sync_pipeline

            if not args.verbose:
                _quiet_console()
            # Prefect logs the failure with its traceback; the console gets the line only.
            with errors.console_logs_without_tracebacks(not args.verbose):
                summary = sync_pipeline(
                    full_refresh=args.full_refresh,
                    build_all=args.build_all,
                    reconcile=args.reconcile,
                )
        print(json.dumps(summary, indent=2, default=str) if args.json else short_summary(summary))
        if summary.get("prefect") is False:
            # Recorded and printed: leave now rather than wait for the MongoDB driver's
            # monitor threads to wind down at exit (up to half a second).
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(0)

    errors.run_cli(run, verbose=args.verbose)


def _quiet_console() -> None:
    """Warnings and errors only on the console: Prefect's run logs still reach its API, dbt's
    its log file; the command prints its own short summary."""
    import os

    from prefect.logging.handlers import PrefectConsoleHandler

    os.environ.setdefault("DBT_QUIET", "true")
    loggers = [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)
                handler.addFilter(_without_run_failures)


def _without_run_failures(record: logging.LogRecord) -> bool:
    """Prefect's own report of a failed flow or task run (the exception's repr, on one long
    line) is left to its API: the command's one error line names the cause and the fix."""
    failed_run = record.levelno >= logging.ERROR and record.name.startswith(
        ("prefect.flow_runs", "prefect.task_runs")
    )
    return not failed_run
