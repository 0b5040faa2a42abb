"""`python -m flows.serve` (`make serve`): a local Prefect server plus the scheduled deployment.

Starts `prefect server start` with its SQLite database under `<PIPELINE_DATA_DIR>/prefect` (the
ephemeral API cannot schedule), then serves `sync_pipeline` every `PIPELINE_SYNC_INTERVAL_MINUTES`
(15 by default), and with `reconcile=True` every `PIPELINE_RECONCILE_INTERVAL_MINUTES` (daily).
Overlap protection: the deployment's concurrency limit of 1 (runs queue, never overlap) on top
of the flow's own Redis lock. `--watch` runs the hot path in this process: the loader's
change-stream follower per collection, which stores every write in `raw` within about 0.1 s and
settles it into `pipeline_state` (see `flows.events.follow_and_signal`), no run per change.
`--events` adds the event-driven mode: a listener blocked on a Redis stream starts a deployment
run within seconds of a signalled change (what the hot path cannot show on its own, or a signal
from `flows.events.signal_change` elsewhere).
The web dashboard (`web`, as `make web` serves it) runs in this process too, at
`PIPELINE_WEB_HOST:PIPELINE_WEB_PORT` (127.0.0.1:8050), unless `--no-web`.

The deployment itself (name, description, parameters, schedules and which one reconciles, the
concurrency limit, tags) is defined once, in `prefect.yaml`, which `prefect deploy` uses on a
server; this module serves that definition, with the intervals of PIPELINE_*_INTERVAL_MINUTES
(their defaults are the file's intervals) or of the options below.

Prefect reads its settings when it is imported, so this module sets the environment first and
imports Prefect only inside `main`.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from flows.settings import REPO_ROOT, FlowSettings
from loader import errors

PREFECT_YAML = REPO_ROOT / "prefect.yaml"


@dataclass(frozen=True)
class Schedule:
    interval_seconds: float
    parameters: dict[str, Any]

    @property
    def reconciles(self) -> bool:
        return bool(self.parameters.get("reconcile"))


@dataclass(frozen=True)
class DeploymentSpec:
    """The one deployment of `prefect.yaml`, as `make serve` serves it."""

    name: str
    description: str
    entrypoint: str
    parameters: dict[str, Any]
    schedules: tuple[Schedule, ...]
    concurrency_limit: int
    collision_strategy: str
    tags: tuple[str, ...]


def deployment_spec(path: Path = PREFECT_YAML) -> DeploymentSpec:
    (spec,) = yaml.safe_load(path.read_text())["deployments"]
    limit = spec["concurrency_limit"]
    return DeploymentSpec(
        name=spec["name"],
        description=spec["description"],
        entrypoint=spec["entrypoint"],
        parameters=dict(spec.get("parameters") or {}),
        schedules=tuple(
            Schedule(float(s["interval"]), dict(s.get("parameters") or {}))
            for s in spec["schedules"]
        ),
        concurrency_limit=int(limit["limit"]),
        collision_strategy=limit["collision_strategy"],
        tags=tuple(spec.get("tags") or ()),
    )


DEPLOYMENT = deployment_spec().name


def prefect_env(settings: FlowSettings, port: int) -> dict[str, str]:
    home = (settings.data_dir / "prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The runner polls for due runs this often; low so an event-driven run starts quickly.
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }


def start_server(settings: FlowSettings, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    prefect_cli = Path(sys.executable).with_name("prefect")
    log = open(log_dir / "prefect-server.log", "ab")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [str(prefect_cli), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise errors.ActionableError(
                f"prefect server exited with code {proc.returncode}; see {log.name}. "
                f"Is port {port} already in use? Set PIPELINE_PREFECT_PORT (or --port).",
                "PIPELINE_PREFECT_PORT",
                server="Prefect",
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"prefect server did not answer on port {port} within 120 s; see {log.name}")


def _event_threads(
    settings: FlowSettings, stop: threading.Event, watch: bool, events: bool = True
) -> list[threading.Thread]:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    from flows.events import follow_and_signal, run_on_signals

    logger = logging.getLogger("flows.events")

    def run(signals: list[dict[str, str]]) -> Any:
        collections = sorted({s.get("collection", "?") for s in signals})
        # Called from a thread without an event loop: the sync form, which returns the run.
        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]
            f"sync-pipeline/{DEPLOYMENT}",
            timeout=None,  # wait: signals are acknowledged only after a finished run
            as_subflow=False,
            tags=["event-driven"],
            flow_run_name=f"on-change-{'-'.join(collections)}",
        )
        if flow_run.state is None or not flow_run.state.is_completed():
            raise RuntimeError(f"flow run {flow_run.id} ended {flow_run.state}")
        return flow_run

    threads: list[threading.Thread] = []
    if events:
        threads.append(
            threading.Thread(
                target=run_on_signals,
                args=(settings, run, stop, logger),
                name="signals",
                daemon=True,
            )
        )
    if watch:
        threads += [
            threading.Thread(
                target=follow_and_signal,
                args=(settings, collection, stop, logger),
                name=f"follow-{collection}",
                daemon=True,
            )
            for collection in settings.collections
        ]
    return threads


def check_servers() -> None:
    """Fail at start, with the one line naming the variable to fix, when a setting is invalid or
    MongoDB or ClickHouse does not answer or refuses the credentials; scheduled runs would only
    fail later, one by one. Redis is optional: the flow runs without it (and says so)."""
    from loader.clients import open_clients
    from loader.settings import Settings

    with open_clients(Settings()):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = errors.cli_parser("python -m flows.serve", __doc__)
    parser.add_argument(
        "--interval-minutes",
        type=float,
        help="schedule interval (default: PIPELINE_SYNC_INTERVAL_MINUTES or 15)",
    )
    parser.add_argument(
        "--reconcile-interval-minutes",
        type=float,
        help="interval of the runs that also reconcile (default: "
        "PIPELINE_RECONCILE_INTERVAL_MINUTES or 1440)",
    )
    parser.add_argument(
        "--port", type=int, help="Prefect server port (default: PIPELINE_PREFECT_PORT or 4200)"
    )
    parser.add_argument(
        "--events",
        action="store_true",
        help="also start a run within seconds of each signalled change (Redis stream)",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="with --events: run the loader's change-stream follower here; it signals changes",
    )
    parser.add_argument(
        "--no-web", action="store_true", help="do not serve the web dashboard from this process"
    )
    parser.add_argument(
        "--no-server",
        action="store_true",
        help="use the Prefect API that PREFECT_API_URL already points to",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API poll otherwise
    errors.quiet_driver_logs(args.verbose)
    errors.run_cli(lambda: _serve(args), verbose=args.verbose)


def _serve(args: argparse.Namespace) -> None:
    settings = FlowSettings()
    for name, default in (
        ("interval_minutes", settings.sync_interval_minutes),
        ("reconcile_interval_minutes", settings.reconcile_interval_minutes),
        ("port", settings.prefect_port),
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    check_servers()
    web = None
    if not args.no_web:  # before Prefect starts: a busy port or a missing password fails fast
        from web.server import BackgroundServer
        from web.settings import WebSettings

        web = BackgroundServer(WebSettings()).start()
        logging.info("Web dashboard at %s", web.url)

    server = None
    if not args.no_server:
        env = prefect_env(settings, args.port)
        os.environ.update(env)  # before Prefect is imported: it reads its settings on import
        server = start_server(settings, args.port, env)
        logging.info("Prefect server at http://127.0.0.1:%d (UI and API)", args.port)

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Interval

    from flows.pipeline import sync_pipeline

    spec = deployment_spec()
    minutes = {False: args.interval_minutes, True: args.reconcile_interval_minutes}

    stop = threading.Event()
    threads = _event_threads(settings, stop, args.watch, args.events)
    for t in threads:
        t.start()
    try:
        sync_pipeline.serve(
            name=spec.name,
            description=spec.description,
            parameters=spec.parameters,
            schedules=[
                Interval(
                    timedelta(minutes=minutes[s.reconciles]),
                    parameters=s.parameters,
                )
                for s in spec.schedules
            ],
            # Runs queue behind a running one instead of overlapping; the flow's Redis lock
            # is the second line (a run that slips through records "skipped").
            global_limit=ConcurrencyLimitConfig(
                limit=spec.concurrency_limit,
                collision_strategy=ConcurrencyLimitStrategy(spec.collision_strategy),
            ),
            limit=spec.concurrency_limit,
            tags=list(spec.tags),
        )
    finally:
        stop.set()
        if web is not None:
            web.stop()
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
