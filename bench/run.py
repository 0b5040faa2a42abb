"""`python -m bench` (`make bench`): every measurement against its baseline, on one dataset.

The bench starts its own embedded stack (temp dir, free ports), seeds it with the deterministic
synthetic source, and runs each measured operation `BENCH_REPEAT` times, each in a fresh
subprocess (`bench.worker`) so memory and caches never carry over between runs. Settings: see
`bench.config`; the report's layout: see `bench.report`. A measurement whose part is missing or
fails is reported as "unavailable: <reason>", and the run goes on.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.catalogue import (
    SHARD_WORKERS,
    SNAPSHOT_MODES,
    WEB_P95_TARGET_MS,
    WEB_PAGES,
    new_comparisons,
    new_measurements,
)
from bench.config import GROUPS, REPO_ROOT, BenchConfig, ConfigError
from bench.report import OK, Comparison, Measurement, percentile, render, write_json
from bench.worker import MARKER

MAIN_DB = "bench"
SMALL_DB = "bench_small"
MIB = 1024 * 1024
# Which measurements each group fills (a group left out marks them "not selected").
GROUP_MEASUREMENTS: dict[str, tuple[str, ...]] = {
    "memory": ("memory.loader_small", "memory.seed_v1_small"),
    "decode": ("decode.pymongo", "decode.pymongoarrow"),
    "drain": ("load.cursor_drain",),
    "dlt": ("load.dlt",),
    "seed_v1": ("load.seed_v1", "memory.seed_v1_full"),
    "loader": ("load.loader", "sync.full", "memory.loader_full"),
    "noop": ("sync.noop", "sync.has_changes", "noop.scheduled_run"),
    "incremental": ("sync.incremental_1pct",),
    "dbt": ("dbt.full_refresh", "dbt.incremental_1pct"),
    "dashboard": ("dashboard.pipeline_state", "dashboard.naive", "dashboard.cached"),
    "web": tuple(f"web.{page}{suffix}" for page, _ in WEB_PAGES for suffix in ("", "_uncached")),
    "freshness": ("freshness.50_per_s", "freshness.500_per_s"),
    "shards": tuple(
        f"{kind}.{n}w{suffix}"
        for kind in ("shards", "snapshot")
        for n in SHARD_WORKERS
        for suffix in ("", "_per_worker", "_rss")
    )
    + ("snapshot.plan", *(f"snapshot.command_{mode}" for mode in SNAPSHOT_MODES)),
}
# Latency targets of the freshness group (issue 12), in ms, and the figure the issue measured
# before the hot path (event-driven flow run + dbt build per change, 100k tasks, 6 probes).
FRESHNESS_TARGETS = {"p50": 500.0, "p99": 1000.0}
FRESHNESS_BEFORE = "p50 8.0 s, max 9.6 s before the hot path (issue 12: a flow run per change)"


class StepFailed(RuntimeError):
    """A measured step could not run; its message becomes the "unavailable" reason."""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if isinstance(exc, StepFailed):
        return text[:600]
    return f"{type(exc).__name__}: {first}"[:600]


@contextmanager
def private_stack(cfg: BenchConfig, console: Console) -> Iterator[tuple[Any, Path]]:
    """A stack of its own (never the `make demo` data), stopped and removed afterwards."""
    from devstack.stack import Stack, start_on_free_ports

    temp = cfg.data_dir is None
    root = Path(tempfile.mkdtemp(prefix="bench-")) if temp else Path(cfg.data_dir or ".")
    root.mkdir(parents=True, exist_ok=True)
    if cfg.port_base:
        base = cfg.port_base
        stack = Stack(root / "stack", base, base + 1, base + 2)
        stack.up()
    else:
        stack = start_on_free_ports(root / "stack")
    ports = [stack.mongo_port, stack.clickhouse_port, stack.redis_port]
    console.log(f"started the bench's stack in {root} (ports {ports})")
    try:
        yield stack, root
    finally:
        try:
            stack.down()
        finally:
            if temp:
                shutil.rmtree(root, ignore_errors=True)


class Harness:
    def __init__(self, cfg: BenchConfig, stack: Any, workdir: Path, console: Console) -> None:
        self.cfg = cfg
        self.stack = stack
        self.workdir = workdir
        self.console = console
        self.env = {
            **_base_env(),
            **stack.env,
            "MONGO_DB": MAIN_DB,
            "PIPELINE_DATA_DIR": str(workdir / "pipeline"),
            "RUNTIME__DLTHUB_TELEMETRY": "false",
            "DLT_DATA_DIR": str(workdir / "dlt-home"),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            # The flow's dbt builds (the `dbt` group, `python -m flows.pipeline` in `noop`).
            "PIPELINE_DBT_PROFILES_DIR": str(workdir / "dbt-profiles"),
            "PIPELINE_DBT_TARGET_PATH": str(workdir / "dbt-target"),
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        self.env.pop("PREFECT_API_URL", None)  # the flow's one run uses a temporary API
        self.measurements = new_measurements(cfg.scale, cfg.small_scale)
        self.dataset: dict[str, Any] = {}
        self.decoder_default: str | None = None
        self.loaded = False  # raw.* holds the main dataset
        self.built = False  # the dbt models are built on it

    @property
    def connection(self) -> Any:
        """The private stack's connection settings, for the clients this process opens."""
        from loader.settings import ConnectionSettings

        return ConnectionSettings(**self.stack.env)

    # -- plumbing ------------------------------------------------------------------------------
    def settings(self, db: str = MAIN_DB) -> Any:
        from loader.settings import Settings

        return Settings(
            mongo_uri=self.stack.mongo_uri,
            mongo_db=db,
            clickhouse_host=self.stack.clickhouse_host,
            clickhouse_port=self.stack.clickhouse_port,
            redis_url=self.stack.redis_url,
        )

    def worker(self, job: dict[str, Any], db: str = MAIN_DB) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "bench.worker", json.dumps(job)]
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO_ROOT,
                env={**self.env, "MONGO_DB": db},
                capture_output=True,
                text=True,
                timeout=self.cfg.worker_timeout,
            )
        except subprocess.TimeoutExpired:
            raise self._timed_out(job) from None
        return _worker_result(job, proc.returncode, proc.stdout, proc.stderr)

    def workers_at_once(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Like `worker`, for several jobs running at the same time (one process each)."""
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.worker", json.dumps(job)],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for job in jobs
        ]
        outputs = []
        try:
            for proc in procs:
                outputs.append(proc.communicate(timeout=self.cfg.worker_timeout))
        except subprocess.TimeoutExpired:
            raise self._timed_out(jobs[0]) from None
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [
            _worker_result(job, proc.returncode, out, err)
            for job, proc, (out, err) in zip(jobs, procs, outputs, strict=True)
        ]

    def _timed_out(self, job: dict[str, Any]) -> StepFailed:
        limit = self.cfg.worker_timeout
        return StepFailed(f"{job['kind']} took longer than BENCH_WORKER_TIMEOUT={limit:g}s")

    def log(self, text: str) -> None:
        self.console.log(text)

    def measure(
        self, keys: tuple[str, ...], run_once: Callable[[int], dict[str, float]], label: str
    ) -> None:
        """Run `run_once(i)` `repeat` times; each returns a figure per measurement key."""
        ms = [self.measurements[k] for k in keys]
        for m in ms:
            m.runs = []
        try:
            for i in range(self.cfg.repeat):
                t0 = time.perf_counter()
                figures = run_once(i)
                for m in ms:
                    m.runs.append(figures[m.key])
                shown = ", ".join(f"{k}={v:,.3f}" for k, v in figures.items())
                self.log(f"{label} run {i + 1}/{self.cfg.repeat}: {shown} ({_secs(t0)})")
            for m in ms:
                m.status = OK
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the run goes on
            reason = _reason(exc)
            self.log(f"[red]{label}: unavailable: {reason}[/red]")
            for m in ms:
                m.unavailable(reason)

    # -- data ----------------------------------------------------------------------------------
    def seed(self) -> None:
        from bench.baselines.seed_v1 import ensure_lookup_index
        from loader.clients import connect_mongo
        from loader.sync import ensure_watermark_index
        from synthetic import seed

        client = connect_mongo(self.connection)
        try:
            t0 = time.perf_counter()
            big = seed(client[MAIN_DB], self.cfg.scale, seed=0)
            self.dataset.update(
                tasks=big.tasks,
                files=big.files,
                employees=big.employees,
                seed_seconds=round(time.perf_counter() - t0, 3),
            )
            dbs = [MAIN_DB]
            if self.cfg.wants("memory"):
                small = seed(client[SMALL_DB], self.cfg.small_scale, seed=0)
                self.dataset["small_tasks"] = small.tasks
                dbs.append(SMALL_DB)
            for db in dbs:
                # One-time setup both the loader (on its first run) and the bench's own readers
                # need; not part of any measured run.
                ensure_watermark_index(client[db].tasks, self.settings(db))
                ensure_lookup_index(self.settings(db))
        finally:
            client.close()
        self.log(f"seeded {self.dataset}")

    def sync(self, collection: str, full: bool, db: str = MAIN_DB) -> dict[str, Any]:
        job = {"kind": "loader_sync", "collection": collection, "full_refresh": full}
        return self.worker(job, db)

    def ensure_loaded(self) -> None:
        if not self.loaded:
            self.log("setup: full load of tasks and employees (not measured)")
            self.sync("employee", True)
            self.sync("tasks", True)
            self.loaded = True

    def dbt_profiles(self) -> Path:
        profiles = self.workdir / "dbt-profiles"
        if not (profiles / "profiles.yml").exists():
            profiles.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / "profiles.yml.example", profiles / "profiles.yml")
        return profiles

    def flow_build(self, sources: list[str], full_refresh: bool) -> float:
        """Seconds of the flow's own dbt build (`flows.dbt_build.run_build`: same runner, same
        selection) of the models downstream of `sources`."""
        self.dbt_profiles()
        job = {"kind": "dbt_build", "sources": sources, "full_refresh": full_refresh}
        return float(self.worker(job)["seconds"])

    def build_as_the_flow(self) -> None:
        """Build downstream of every source as a flow run does, and clear the build marks."""
        from datetime import UTC, datetime

        from loader.build_pending import clear_build_pending
        from loader.clients import connect_clickhouse

        collections = list(_collections())
        started = datetime.now(UTC)
        self.flow_build(collections, False)
        ch = connect_clickhouse(self.settings())
        try:
            clear_build_pending(ch, collections, "bench", build_started_at=started)
        finally:
            ch.close()
        self.built = True

    def scheduled_run(self) -> dict[str, Any]:
        """`python -m flows.pipeline --json`, timed from the outside (imports included)."""
        self.dbt_profiles()
        cmd = [sys.executable, "-m", "flows.pipeline", "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise StepFailed(f"python -m flows.pipeline failed: {(lines or ['?'])[-1][:400]}")
        out = proc.stdout.splitlines()
        start = max(i for i, line in enumerate(out) if line == "{")
        return {"seconds": seconds, **json.loads("\n".join(out[start:]))}

    def dbt(self, *args: str) -> float:
        profiles = self.dbt_profiles()
        cmd = [
            str(Path(sys.executable).parent / "dbt"),
            *args,
            "--project-dir",
            str(REPO_ROOT),
            "--profiles-dir",
            str(profiles),
            "--target-path",
            str(self.workdir / "dbt-target"),
            "--log-path",
            str(self.workdir / "dbt-logs"),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            lines = [ln for ln in proc.stdout.splitlines() if "ERROR" in ln or "FAIL" in ln]
            raise StepFailed(f"dbt {' '.join(args)} failed: " + " | ".join(lines[-3:])[:500])
        return seconds

    def ensure_built(self) -> None:
        if not self.built:
            self.log("setup: dbt build --full-refresh (not measured)")
            self.dbt("build", "--full-refresh")
            self.built = True

    def mutate(self, i: int) -> int:
        """Change 1% of the tasks; returns how many documents now carry a new `updated_at`."""
        from datetime import UTC, datetime, timedelta

        from loader.clients import connect_mongo
        from synthetic import mutate

        client = connect_mongo(self.connection)
        try:
            db = client[MAIN_DB]
            since = datetime.now(UTC) - timedelta(milliseconds=1)
            mutate(db, fraction=0.01, seed=1000 + i)
            return db.tasks.count_documents({"updated_at": {"$gte": since}})
        finally:
            client.close()

    # -- groups, in the order they run ---------------------------------------------------------
    def run_memory(self) -> None:
        def loader(i: int) -> dict[str, float]:
            r = self.sync("tasks", True, SMALL_DB)
            return {"memory.loader_small": r["peak_rss_bytes"] / MIB}

        def seed_v1(i: int) -> dict[str, float]:
            r = self.worker({"kind": "seed_v1"}, SMALL_DB)
            return {"memory.seed_v1_small": r["peak_rss_bytes"] / MIB}

        self.measure(("memory.loader_small",), loader, "loader RSS (small)")
        self.loaded = False  # raw.tasks now holds the small dataset
        self.measure(("memory.seed_v1_small",), seed_v1, "seed v1 RSS (small)")
        for key in GROUP_MEASUREMENTS["memory"]:
            self.measurements[key].note = f"{self.cfg.small_scale:,} tasks; whole-process peak"

    def run_decode(self) -> None:
        for how in ("pymongo", "pymongoarrow"):

            def once(i: int, how: str = how) -> dict[str, float]:
                r = self.worker({"kind": "decode", "how": how})
                self.decoder_default = r["extra"]["loader_default"]
                return {f"decode.{how}": r["items"] / r["seconds"]}

            self.measure((f"decode.{how}",), once, f"decode {how}")
        if self.decoder_default:
            key = f"decode.{self.decoder_default}"
            self.measurements[key].note = "the loader's default"

    def run_drain(self) -> None:
        def once(i: int) -> dict[str, float]:
            r = self.worker({"kind": "drain"})
            return {"load.cursor_drain": r["items"] / r["seconds"]}

        self.measure(("load.cursor_drain",), once, "cursor drain")

    def run_dlt(self) -> None:
        from devstack.process import free_ports

        # The embedded ClickHouse has no native TCP port; point dlt at a closed one.
        native_port = free_ports(1)[0]
        m = self.measurements["load.dlt"]
        load = False
        try:
            r = self.worker(
                {
                    "kind": "dlt_try_load",
                    "pipelines_dir": str(self.workdir / "dlt" / "try"),
                    "native_port": native_port,
                }
            )
            error = r["extra"]["error"]
            load = error is None
        except Exception as exc:  # noqa: BLE001
            error = _reason(exc)
        if load:
            note = "full dlt run: extract + normalize + load into the embedded ClickHouse"
        else:
            note = (
                "extract + normalize only: dlt's ClickHouse destination could not load into the "
                f"embedded (HTTP-only) ClickHouse: {error}"
            )
        self.log(f"dlt: {note}")

        def once(i: int) -> dict[str, float]:
            pipelines = self.workdir / "dlt" / f"run{i}"
            try:
                job = {
                    "kind": "dlt_run",
                    "pipelines_dir": str(pipelines),
                    "native_port": native_port,
                    "load": load,
                }
                r = self.worker(job)
            finally:
                shutil.rmtree(pipelines, ignore_errors=True)
            return {"load.dlt": r["items"] / r["seconds"]}

        self.measure(("load.dlt",), once, "dlt")
        m.note = note

    def run_seed_v1(self) -> None:
        def once(i: int) -> dict[str, float]:
            r = self.worker({"kind": "seed_v1"})
            return {
                "load.seed_v1": r["items"] / r["seconds"],
                "memory.seed_v1_full": r["peak_rss_bytes"] / MIB,
            }

        self.measure(("load.seed_v1", "memory.seed_v1_full"), once, "seed v1")

    def run_loader(self) -> None:
        self.sync("employee", True)

        def once(i: int) -> dict[str, float]:
            r = self.sync("tasks", True)
            return {
                "load.loader": r["items"] / r["seconds"],
                "sync.full": r["seconds"],
                "memory.loader_full": r["peak_rss_bytes"] / MIB,
            }

        self.measure(("load.loader", "sync.full", "memory.loader_full"), once, "loader full")
        self.loaded = self.measurements["load.loader"].ok
        self.built = False

    def run_shards(self) -> None:
        """1, 2 and 4 shard workers load the whole collection at once, from an empty table:
        throughput of all of them together (documents over the span from the first start to
        the last end, interpreter start-up left out), per worker, and each worker's peak RSS;
        then the same for 1, 2 and 4 snapshot range workers, and the one `snapshot` command
        with its ranges in processes and in threads."""
        for n in SHARD_WORKERS:
            keys = (f"shards.{n}w", f"shards.{n}w_per_worker", f"shards.{n}w_rss")
            self.measure(keys, functools.partial(self._shards_once, n), f"shards x{n}")
        # The same loads split by `_id` range (`loader.snapshot`), after the same emptying;
        # the plan (resume point + `$sample`) is timed on its own, before the range workers.
        for n in SHARD_WORKERS:
            plan = ("snapshot.plan",) if n == SHARD_WORKERS[-1] else ()
            figures = (f"snapshot.{n}w", f"snapshot.{n}w_per_worker", f"snapshot.{n}w_rss", *plan)
            self.measure(figures, functools.partial(self._snapshot_once, n), f"snapshot x{n}")
        for mode in SNAPSHOT_MODES:
            self.measure(
                (f"snapshot.command_{mode}",),
                functools.partial(self._snapshot_command_once, mode),
                f"snapshot command, {mode}",
            )
        self.loaded = self.measurements[f"snapshot.{SHARD_WORKERS[-1]}w"].ok
        self.built = False

    def _empty_tasks(self) -> None:
        """Not measured: the tables exist, and every run loads everything from nothing."""
        from loader.clients import connect_clickhouse
        from loader.schema import SNAPSHOT_RANGES, ensure_schema
        from loader.watermark import reset_watermark

        ch = connect_clickhouse(self.settings())
        try:
            ensure_schema(ch)
            ch.command("TRUNCATE TABLE raw.tasks")
            ch.command(f"TRUNCATE TABLE {SNAPSHOT_RANGES.qualified}")
            reset_watermark(ch, "tasks")
        finally:
            ch.close()

    def _workers_figures(self, kind: str, n: int, jobs: list[dict[str, Any]]) -> dict[str, float]:
        """N workers at once: documents over the span from the first start to the last end
        (interpreter start-up left out), per worker, and the largest peak RSS."""
        results = self.workers_at_once(jobs)
        docs = sum(r["items"] for r in results)
        if docs != self.dataset.get("tasks", docs):
            raise StepFailed(f"{n} {kind} workers read {docs:,} tasks, not all of them")
        span = max(r["extra"]["ended_at"] for r in results) - min(
            r["extra"]["started_at"] for r in results
        )
        return {
            f"{kind}.{n}w": docs / span,
            f"{kind}.{n}w_per_worker": sum(r["items"] / r["seconds"] for r in results) / n,
            f"{kind}.{n}w_rss": max(r["peak_rss_bytes"] for r in results) / MIB,
        }

    def _shards_once(self, n: int, run: int) -> dict[str, float]:
        self._empty_tasks()
        jobs = [{"kind": "loader_shard", "shard": f"{i}/{n}"} for i in range(n)]
        return self._workers_figures("shards", n, jobs)

    def _snapshot_once(self, n: int, run: int) -> dict[str, float]:
        self._empty_tasks()
        plan = self.worker({"kind": "snapshot_plan", "workers": n})
        jobs = [{"kind": "snapshot_range", "range": f"{k}/{n}"} for k in range(n)]
        return self._workers_figures("snapshot", n, jobs) | {"snapshot.plan": plan["seconds"]}

    def _snapshot_command_once(self, mode: str, run: int) -> dict[str, float]:
        self._empty_tasks()
        n = SHARD_WORKERS[-1]
        r = self.worker({"kind": "snapshot_command", "workers": n, "threads": mode == "threads"})
        return {f"snapshot.command_{mode}": r["items"] / r["seconds"]}

    def run_noop(self) -> None:
        self.ensure_loaded()
        docs: list[int] = []

        def sync(i: int) -> dict[str, float]:
            r = self.sync("tasks", False)
            docs.append(r["extra"]["docs_read"])
            return {"sync.noop": r["seconds"]}

        def probe(i: int) -> dict[str, float]:
            r = self.worker({"kind": "has_changes"})
            if r["extra"]["changed"]:
                raise StepFailed("has_changes said True with nothing changed")
            return {"sync.has_changes": r["seconds"]}

        self.measure(("sync.noop",), sync, "no-op sync")
        self.measurements["sync.noop"].detail["docs_read"] = docs
        self.measure(("sync.has_changes",), probe, "has_changes")

        # A scheduled run with nothing to do: the models built as the flow builds them, the
        # build marks cleared and one run (untimed), then the timed runs, which must skip
        # without Prefect.
        def scheduled(i: int) -> dict[str, float]:
            r = self.scheduled_run()
            if r.get("status") != "skipped" or r.get("prefect") is not False:
                raise StepFailed(f"the no-op run did not skip without Prefect: {r.get('message')}")
            return {"noop.scheduled_run": r["seconds"]}

        try:
            self.log("setup: the flow's dbt build of every source (not measured)")
            self.build_as_the_flow()
            # A scheduled run follows other runs: the first one counts the raw tables in full
            # (nothing remembered yet), the steady state does not.
            self.scheduled_run()
        except Exception as exc:  # noqa: BLE001 - reported as the measurement's reason
            self.measurements["noop.scheduled_run"].unavailable(_reason(exc))
            return
        self.measure(("noop.scheduled_run",), scheduled, "no-op scheduled run")
        self.measurements["noop.scheduled_run"].note = "`python -m flows.pipeline`, wall"

    def run_changes(self) -> None:
        """1% of tasks change, then the loader syncs and dbt builds (each timed if selected)."""
        want_sync, want_dbt = self.cfg.wants("incremental"), self.cfg.wants("dbt")
        self.ensure_loaded()
        if want_dbt:
            # The flow's runner and selections on both sides: every source with
            # --full-refresh, and downstream of tasks after the 1% change.
            every = list(_collections())
            # Both sides start from a parsed project (dbt's partial parsing), as the flow's
            # builds after the first do; otherwise the first measured build pays the parse.
            self.dbt_profiles()
            self.dbt("parse")
            self.measure(
                ("dbt.full_refresh",),
                lambda i: {"dbt.full_refresh": self.flow_build(every, True)},
                "dbt full refresh",
            )
            self.built = self.measurements["dbt.full_refresh"].ok
        elif self.cfg.wants("dashboard") or self.cfg.wants("web"):
            self.ensure_built()
        wanted = {"sync.incremental_1pct": want_sync, "dbt.incremental_1pct": want_dbt}
        keys = tuple(k for k, yes in wanted.items() if yes)
        changed: list[int] = []
        docs: list[int] = []

        # On a schedule, the changes a run reads are older than the loader's overlap window
        # (a write can commit late by that much), so the window re-reads only the last
        # seconds before the previous run. Runs seconds apart would re-read the previous
        # rounds' changes too: wait the window out (untimed) before each measured sync.
        settle = self.settings().overlap_seconds + 1

        def once(i: int) -> dict[str, float]:
            changed.append(self.mutate(i))
            time.sleep(settle)
            r = self.sync("tasks", False)
            docs.append(r["extra"]["docs_read"])
            figures = {"sync.incremental_1pct": r["seconds"]}
            if want_dbt:
                if not self.built:
                    raise StepFailed("dbt full refresh did not succeed")
                figures["dbt.incremental_1pct"] = self.flow_build(["tasks"], False)
            return {k: v for k, v in figures.items() if k in keys}

        if keys:
            self.measure(keys, once, "1% change")
            detail = {"tasks_changed": changed, "docs_read": docs}
            for k in keys:
                self.measurements[k].detail.update(detail)
            self.measurements[
                "sync.incremental_1pct"
            ].note = f"each round's changes are {settle:g} s old when the sync starts (> overlap)"

    def run_dashboard(self) -> None:
        self.ensure_loaded()
        self.ensure_built()
        for page, key in (
            ("state", "dashboard.pipeline_state"),
            ("naive", "dashboard.naive"),
            ("cached", "dashboard.cached"),
        ):
            m = self.measurements[key]
            try:
                job = {"kind": "dashboard", "page": page, "runs": self.cfg.dashboard_runs}
                r = self.worker(job)
                m.runs = [s * 1000 for s in r["extra"]["samples_s"]]
                m.status = OK
                m.detail = {
                    "first_load_ms": round(r["extra"]["first_load_s"] * 1000, 3),
                    "rows_per_page": r["extra"]["rows_per_page"],
                }
                m.note = f"{len(m.runs)} page loads after one warm-up load"
                p50, p95 = m.stat("p50") or 0, m.stat("p95") or 0
                self.log(f"dashboard {page}: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
            except Exception as exc:  # noqa: BLE001
                m.unavailable(_reason(exc))
                self.log(f"[red]dashboard {page}: {m.status}[/red]")

    def run_web(self) -> None:
        """Server time per page of the web dashboard, cached and uncached (`bench.web`)."""
        self.ensure_loaded()
        self.ensure_built()
        job = {"kind": "web", "runs": self.cfg.dashboard_runs}
        r = self.worker(job)
        for page, _ in WEB_PAGES:
            for suffix, mode in (("", "cached"), ("_uncached", "uncached")):
                m = self.measurements[f"web.{page}{suffix}"]
                m.runs = list(r["extra"][page][mode])
                m.status = OK
                p95 = m.stat("p95") or 0.0
                verdict = "meets" if p95 <= WEB_P95_TARGET_MS else "misses"
                m.note = (
                    f"{len(m.runs)} requests; p95 {p95:.1f} ms {verdict} the "
                    f"{WEB_P95_TARGET_MS:g} ms target"
                    if not suffix
                    else f"{len(m.runs)} requests, each after a version bump (all queries miss)"
                )
                self.log(f"web {page} {mode}: p50 {m.stat('p50') or 0:.1f} ms, p95 {p95:.1f} ms")

    @contextmanager
    def follower(self, log_name: str) -> Iterator[subprocess.Popen[bytes]]:
        """The hot path as its own process: `python -m loader watch --all-changes` on tasks,
        from "now" (`--reset`), ready once it has saved its stream position."""
        from loader.clients import connect_clickhouse

        log_path = self.workdir / f"{log_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "loader", "watch", "--collection", "tasks"]
                + ["--all-changes", "--reset"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        ch = connect_clickhouse(self.connection)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise StepFailed(f"the follower exited with {proc.returncode}; see {log_path}")
                saved = ch.query(
                    "SELECT max(saved_at) FROM ops.change_stream_state "
                    "WHERE collection = 'tasks' AND resume_token != ''"
                ).result_rows
                if saved and saved[0][0] and saved[0][0].timestamp() > started:
                    break
                time.sleep(0.2)
            else:
                raise StepFailed(f"the follower did not start within 120 s; see {log_path}")
            yield proc
        finally:
            ch.close()
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def run_freshness(self) -> None:
        self.ensure_loaded()
        self.ensure_built()
        seconds, probes = self.cfg.freshness_seconds, self.cfg.freshness_probes
        for rate, key in ((50, "freshness.50_per_s"), (500, "freshness.500_per_s")):
            m = self.measurements[key]
            try:
                with self.follower(f"follower-{rate}"):
                    r = self.worker(
                        {
                            "kind": "freshness",
                            "rate": rate,
                            "seconds": seconds,
                            "probes_per_s": probes,
                        }
                    )
                extra = r["extra"]
                if not extra["latencies_s"]:
                    raise StepFailed(f"no probe became visible ({extra['unseen']} timed out)")
                m.runs = [x * 1000 for x in extra["latencies_s"]]
                m.status = OK
                by_kind: dict[str, list[float]] = {}
                for kind, x in zip(extra["kinds"], m.runs, strict=True):
                    by_kind.setdefault(kind, []).append(x)
                achieved = extra["writes"] / extra["write_seconds"]
                p50, p99 = m.stat("p50") or 0.0, m.stat("p99") or 0.0
                m.detail = {
                    "writes_per_s": round(achieved, 1),
                    "writes": extra["writes"],
                    "seconds": round(extra["write_seconds"], 1),
                    "mix": extra["mix"],
                    "probes_unseen_within_30s": extra["unseen"],
                    "probe_ticks_deferred": extra.get("deferred", 0),
                    "poll_ms_p50": extra.get("poll_ms_p50"),
                    "p50_ms_by_kind": {
                        k: round(percentile(v, 50), 1) for k, v in sorted(by_kind.items())
                    },
                    "targets_ms": FRESHNESS_TARGETS,
                    "targets_met": p50 <= FRESHNESS_TARGETS["p50"]
                    and p99 <= FRESHNESS_TARGETS["p99"]
                    and extra["unseen"] == 0,
                    "before": FRESHNESS_BEFORE,
                }
                m.note = (
                    f"{len(m.runs)} probes over {seconds} s at {achieved:.0f} writes/s "
                    f"({self.dataset.get('tasks', 0):,} tasks); target p50 <= 500 ms, "
                    "p99 <= 1000 ms"
                )
                self.log(f"freshness {rate}/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
            except Exception as exc:  # noqa: BLE001
                m.unavailable(_reason(exc))
                self.log(f"[red]freshness {rate}/s: {m.status}[/red]")

    def run_all(self) -> None:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("memory", self.run_memory),
            ("decode", self.run_decode),
            ("drain", self.run_drain),
            ("dlt", self.run_dlt),
            ("seed_v1", self.run_seed_v1),
            ("loader", self.run_loader),
            ("noop", self.run_noop),
        ]
        for group, step in steps:
            if self.cfg.wants(group):
                self._guarded(group, step)
        if self.cfg.wants("incremental") or self.cfg.wants("dbt"):
            self._guarded("incremental", self.run_changes)
        if self.cfg.wants("dashboard"):
            self._guarded("dashboard", self.run_dashboard)
        if self.cfg.wants("web"):
            self._guarded("web", self.run_web)
        if self.cfg.wants("freshness"):
            self._guarded("freshness", self.run_freshness)
        if self.cfg.wants("shards"):
            self._guarded("shards", self.run_shards)

    def _guarded(self, group: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - setup of a group failed: report, go on
            reason = _reason(exc)
            self.log(f"[red]{group}: unavailable: {reason}[/red]")
            keys = GROUP_MEASUREMENTS[group]
            if group == "incremental":
                keys = keys + GROUP_MEASUREMENTS["dbt"]
            for key in keys:
                if not self.measurements[key].ok:
                    self.measurements[key].unavailable(reason)


def _worker_result(job: dict[str, Any], code: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The `BENCH_RESULT` line a worker printed, or why it failed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER) and code == 0:
            return dict(json.loads(line[len(MARKER) :]))
    # The last line of a traceback names the exception; that is the reason to report.
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    raise StepFailed(f"{job['kind']} failed (exit {code}): {last}")


def _collections() -> tuple[str, ...]:
    from loader.schema import COLLECTIONS

    return COLLECTIONS


def _base_env() -> dict[str, str]:
    return dict(os.environ)


def _secs(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f}s wall"


def _mark_unselected(cfg: BenchConfig, measurements: dict[str, Measurement]) -> None:
    for group in GROUPS:
        if not cfg.wants(group):
            for key in GROUP_MEASUREMENTS[group]:
                measurements[key].unavailable(f"group {group!r} not selected (BENCH_ONLY/SKIP)")


def main() -> int:
    console = Console()
    progress = Console(stderr=True)
    try:
        cfg = BenchConfig.from_env()
    except ConfigError as exc:
        progress.print(f"[red]bench: {exc}[/red]")
        return 2
    progress.log(
        f"bench: scale {cfg.scale:,} tasks (small {cfg.small_scale:,}), repeat {cfg.repeat}, "
        f"dashboard runs {cfg.dashboard_runs}, "
        f"groups {', '.join(g for g in GROUPS if cfg.wants(g))}"
    )
    measurements: dict[str, Measurement] = new_measurements(cfg.scale, cfg.small_scale)
    comparisons: dict[str, Comparison] = new_comparisons()
    dataset: dict[str, Any] = {}
    decoder: str | None = None
    t0 = time.perf_counter()
    try:
        with private_stack(cfg, progress) as (stack, root):
            harness = Harness(cfg, stack, root / "work", progress)
            measurements = harness.measurements
            dataset = harness.dataset
            harness.seed()
            harness.run_all()
            decoder = harness.decoder_default
    except Exception as exc:  # noqa: BLE001 - no stack / no data: every figure is unavailable
        reason = _reason(exc)
        progress.log(f"[red]bench could not run: {reason}[/red]")
        for m in measurements.values():
            if not m.ok:
                m.unavailable(f"bench setup failed: {reason}")
    _mark_unselected(cfg, measurements)
    for c in comparisons.values():
        c.evaluate(measurements)
    config = {
        "scale": cfg.scale,
        "small_scale": cfg.small_scale,
        "repeat": cfg.repeat,
        "dashboard_runs": cfg.dashboard_runs,
        "groups": [g for g in GROUPS if cfg.wants(g)],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    render(
        measurements,
        comparisons,
        console,
        f"bench: {cfg.scale:,} tasks, {cfg.repeat} run(s) each, median/min/max",
    )
    write_json(
        cfg.output,
        config=config,
        dataset=dataset,
        decoder_default=decoder,
        measurements=measurements,
        comparisons=comparisons,
    )
    console.print(f"wrote {cfg.output}")
    return 0
