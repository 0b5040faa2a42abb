"""`python -m loader sync|watch|reconcile|seed`: the loader's command line."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from loader import errors
from loader.clients import ServerUnavailable, open_clients
from loader.failed_runs import sync_clients
from loader.runs import RunKind
from loader.schema import COLLECTIONS
from loader.settings import Settings
from loader.shards import UNSHARDED, Shard, ShardSpecError, parse_shard
from loader.snapshot_ranges import RangeSpec, RangeSpecError, parse_range

if TYPE_CHECKING:
    from loader.follower import StoredBatch
    from loader.sync import SyncResult

T = TypeVar("T")

app = typer.Typer(
    help="Stream changed MongoDB documents into ClickHouse `raw` tables (see docs/ARCHITECTURE.md)."
    " Servers come from MONGO_URI, MONGO_DB, CLICKHOUSE_HOST/PORT/USER/PASSWORD."
    f" {errors.CLI_HELP}",
    no_args_is_help=True,
    add_completion=False,
)
VERBOSE_HELP = "Log progress, and on failure print the traceback too."
_verbose = False  # the running command's --verbose, for `main`

# Summary tables stay readable when the output is piped (rich assumes 80 columns then).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class Which(StrEnum):
    tasks = "tasks"
    employee = "employee"
    all = "all"


def _collections(which: Which) -> list[str]:
    return list(COLLECTIONS) if which == Which.all else [which.value]


def _setup_logging(verbose: bool) -> None:
    global _verbose
    _verbose = verbose
    errors.quiet_driver_logs(verbose)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


class _RichProgress:
    """Adapter from the loader's progress protocol to a rich progress bar."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def start(self, collection: str, total: int | None) -> None:
        self.task = self.progress.add_task(f"sync {collection}", total=total)

    def advance(self, docs: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, docs)


def _settings() -> Settings:
    """Settings from the environment, or exit naming each variable that is wrong."""
    try:
        return Settings()
    except ValidationError as exc:
        raise _fail(exc) from None


def _fail(exc: BaseException) -> typer.Exit:
    """Print `exc` as one line naming what to fix (see `loader.errors`); the exit to raise."""
    return typer.Exit(code=errors.report(exc, verbose=_verbose))


def _option(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A typer parser from a spec parser: its error (naming the right form) as a bad value."""

    def parser(value: str) -> T:
        try:
            return parse(value)
        except (ShardSpecError, RangeSpecError) as exc:
            raise typer.BadParameter(str(exc)) from None

    return parser


def _load_cells(r: SyncResult) -> list[str]:
    """The summary cells of a load run: read, written, rejects, seconds, docs/s, peak RSS."""
    rate = r.docs_read / r.duration_s if r.duration_s > 0 else 0.0
    return [
        f"{r.docs_read:,}",
        f"{r.rows_written:,}",
        f"{r.rejects:,}",
        f"{r.duration_s:.2f}",
        f"{rate:,.0f}",
        f"{r.peak_rss_bytes / 2**20:.0f}",
    ]


@app.command()
def sync(
    collection: Annotated[Which, typer.Option(help="Collection to load.")] = Which.all,
    full_refresh: Annotated[
        bool,
        typer.Option(
            "--full-refresh",
            help="Empty raw.<collection>, its rejects and its watermark, then reload.",
        ),
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Documents per batch (default LOADER_BATCH_SIZE).")
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bars (default: when a TTY)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
    shard: Annotated[
        Shard | None,
        typer.Option(
            parser=_option(parse_shard),
            metavar="I/N",
            help="Load only the documents whose _id hashes to shard I of N, from that shard's "
            "own watermark; run N of them at once (I = 0 .. N-1).",
        ),
    ] = None,
) -> None:
    """Load what changed since the watermark into raw.<collection>, then print a summary.

    A failed load is recorded in ops.sync_runs, and its error line says whether the watermark
    moved (batches stored before the failure move it; the next run resumes there)."""
    from loader.sync import sync_collection

    _setup_logging(verbose)
    if shard is not None and shard.sharded and full_refresh:
        raise typer.BadParameter(
            "--full-refresh empties the table for every shard: run it once without --shard",
            param_hint="--shard",
        )
    settings = _settings()
    show = sys.stdout.isatty() if progress is None else progress
    results = []
    try:
        with sync_clients(settings, _collections(collection)) as clients:
            bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                disable=not show,
            )
            with bars:
                sink = _RichProgress(bars) if show else None
                for name in _collections(collection):
                    results.append(
                        sync_collection(
                            settings,
                            name,
                            full_refresh=full_refresh,
                            batch_size=batch_size,
                            clients=clients,
                            progress=sink,
                            shard=shard or UNSHARDED,
                        )
                    )
    except ServerUnavailable as exc:
        raise _fail(exc) from exc
    table = Table(title=f"sync, shard {shard}" if shard and shard.sharded else "sync")
    for col in ("collection", "read", "written", "rejects", "seconds", "docs/s", "peak RSS MiB"):
        table.add_column(col, justify="left" if col == "collection" else "right")
    table.add_column("watermark")
    for r in results:
        table.add_row(r.collection, *_load_cells(r), r.watermark_after or "-")
        if r.index_created:
            console.print(f"created the (updated_at, _id) index on {r.collection}")
        if r.source_replaced:
            console.print(f"[yellow]{r.source_replaced}[/]", soft_wrap=True)
    console.print(table)
    if any(r.rows_written or r.rejects for r in results):
        console.print("the next flow run (`make sync`) builds the models downstream of this load")


@app.command()
def snapshot(
    collection: Annotated[Which, typer.Option(help="Collection to load.")] = Which.tasks,
    workers: Annotated[
        int, typer.Option(min=1, help="Number of _id ranges, loaded at once by this command.")
    ] = 4,
    range_: Annotated[
        RangeSpec | None,
        typer.Option(
            "--range",
            parser=_option(parse_range),
            metavar="k/N",
            help="Load only range k of the stored plan of N ranges (one worker; run the N "
            "of them anywhere, after --plan). The last one to finish writes the watermark.",
        ),
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Only take the change-stream resume point and store the plan of --workers "
            "ranges, for --range workers started elsewhere.",
        ),
    ] = False,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload",
            help="Load a collection that is already loaded again: empties raw.<collection>, "
            "its rejects and its watermarks first (as sync --full-refresh).",
        ),
    ] = False,
    threads: Annotated[
        bool,
        typer.Option(
            "--threads", help="Run the ranges in threads of this process (default: processes)."
        ),
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Documents per batch (default LOADER_BATCH_SIZE).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """First load of a large collection, split by _id range over N workers.

    Before any read it stores the collection's change-stream position (ops.change_stream_state),
    so `python -m loader watch --all-changes` replays every write made during the snapshot;
    then it picks N-1 split points of _id from a $sample and loads each range in _id order,
    saving the range's progress after each stored batch (a killed worker resumes there: run the
    same command again). When every range is done it writes the watermark, so the next
    `python -m loader sync` reads only what changed since the snapshot started. Refused when
    the collection is already loaded (use sync, or --reload)."""
    from loader.snapshot import load_range, plan_snapshot, run_snapshot

    _setup_logging(verbose)
    settings = _settings()
    names = _collections(collection)
    results = []
    try:
        with sync_clients(settings, names) as clients:
            for name in names:
                if plan:
                    ranges = plan_snapshot(settings, name, workers, reload=reload, clients=clients)
                    console.print(
                        f"{name}: plan of {len(ranges)} ranges stored; start the workers with "
                        f"`python -m loader snapshot --collection {name} --range k/{len(ranges)}`"
                    )
                elif range_ is not None:
                    results.append(
                        load_range(settings, name, range_, batch_size=batch_size, clients=clients)
                    )
                else:
                    results += run_snapshot(
                        settings,
                        name,
                        workers,
                        reload=reload,
                        processes=not threads,
                        batch_size=batch_size,
                        clients=clients,
                    )
    except ServerUnavailable as exc:
        raise _fail(exc) from exc
    if not results:
        return
    table = Table(title="snapshot")
    for col in ("collection", "range", "read", "written", "rejects", "seconds", "docs/s"):
        table.add_column(col, justify="left" if col in ("collection", "range") else "right")
    table.add_column("peak RSS MiB", justify="right")
    for r in results:
        table.add_row(r.collection, r.shard, *_load_cells(r))
    console.print(table)
    for r in results:
        if "watermark written" in r.message:
            console.print(f"{r.collection}: snapshot complete; `python -m loader sync` goes on")


@app.command()
def watch(
    collection: Annotated[Which, typer.Option(help="Collection(s) to follow.")] = Which.all,
    idle_timeout: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without a delete event.")
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="Forget the stored resume token; start from now.")
    ] = False,
    all_changes: Annotated[
        bool,
        typer.Option("--all-changes", help="Also load inserts and updates as they happen."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Follow the change stream and tombstone deleted documents (Ctrl-C or SIGTERM to stop).

    The resume token is stored in ops.change_stream_state after each processed batch of events,
    so a restart resumes where the previous run stopped. Stopping stores and settles the batch
    in hand and saves the position after it first. Each batch settled into pipeline_state
    bumps the dashboard cache's version in Redis (REDIS_URL, PIPELINE_REDIS_PREFIX), so open
    pages show it at once."""
    from loader.follower import FollowResult, follow_changes, reset_resume_token

    _setup_logging(verbose)
    settings = _settings()
    stop = threading.Event()
    results: dict[str, FollowResult] = {}
    errors: list[BaseException] = []
    names = _collections(collection)
    try:
        with (
            _dashboard_refresher() as refresh_dashboard,
            sync_clients(settings, names, RunKind.watch) as clients,
        ):
            if reset:
                for name in names:
                    reset_resume_token(settings, name, clients=clients)

            def run(name: str) -> None:
                try:
                    results[name] = follow_changes(
                        settings,
                        name,
                        idle_timeout_s=idle_timeout,
                        stop=stop,
                        all_changes=all_changes,
                        on_flush=lambda events, deletes: logging.getLogger("loader.watch").info(
                            "%s: %d delete events, %d tombstones", name, events, deletes
                        ),
                        on_stored=refresh_dashboard,
                    )
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    stop.set()

            threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in names]
            # A service manager stops a process with SIGTERM: the same clean stop as Ctrl-C.
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            console.print(f"following {', '.join(names)} (Ctrl-C or SIGTERM to stop)")
            for t in threads:
                t.start()
            try:
                while any(t.is_alive() for t in threads):
                    for t in threads:
                        t.join(timeout=0.5)
            except KeyboardInterrupt:
                stop.set()
                for t in threads:
                    t.join()
    except ServerUnavailable as exc:
        raise _fail(exc) from exc
    if errors:
        raise _fail(errors[0])
    table = Table(title="watch")
    for col in ("collection", "events", "tombstones", "resumed", "stopped"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(
            name,
            str(r.events),
            str(r.deletes),
            str(r.resumed),
            str(r.stopped_because),
        )
    console.print(table)


@contextmanager
def _dashboard_refresher() -> Iterator[Callable[[StoredBatch], bool]]:
    """The service follower's `on_stored` hook (`flows.cache.settled_batch_refresher`): each
    batch settled into `pipeline_state` refreshes open dashboard pages. A wrong PIPELINE_*
    variable exits naming it. The cache belongs to `flows` (which builds on the loader): only
    this command imports it, so the loader's library modules stay free of it."""
    from flows.cache import settled_batch_refresher
    from flows.settings import FlowSettings

    try:
        flow_settings = FlowSettings()
    except ValidationError as exc:
        raise _fail(exc) from None
    with settled_batch_refresher(flow_settings, logging.getLogger("loader.watch")) as refresh:
        yield refresh


@app.command()
def reconcile(
    collection: Annotated[Which, typer.Option(help="Collection(s) to check.")] = Which.all,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Repair what the watermark read cannot see: deletes, late writes, backward updates.

    MongoDB's ids and updated_at (one covered index scan) are uploaded to ClickHouse, which
    finds the ids whose two sides differ; those are repaired page by page, in bounded memory
    whatever their number. Ids gone from MongoDB get a tombstone; documents ClickHouse lacks or
    holds with another updated_at are loaded."""
    from loader.reconcile import reconcile_collection

    _setup_logging(verbose)
    settings = _settings()
    try:
        with sync_clients(settings, _collections(collection), RunKind.reconcile) as clients:
            results = [
                reconcile_collection(settings, n, clients=clients) for n in _collections(collection)
            ]
    except ServerUnavailable as exc:
        raise _fail(exc) from exc
    table = Table(title="reconcile")
    cols = ("collection", "mongo ids", "clickhouse ids", "differ", "tombstones")
    for col in (*cols, "missing", "stale", "rows loaded", "rejects", "seconds"):
        table.add_column(col, justify="left" if col == "collection" else "right")
    for r in results:
        table.add_row(
            r.collection,
            f"{r.mongo_ids:,}",
            f"{r.clickhouse_ids:,}",
            f"{r.differing:,}",
            f"{r.deletes:,}",
            f"{r.missing_in_clickhouse:,}",
            f"{r.stale_in_clickhouse:,}",
            f"{r.rows_written:,}",
            f"{r.rejects:,}",
            f"{r.duration_s:.2f}",
        )
    console.print(table)


@app.command()
def check(
    collection: Annotated[Which, typer.Option(help="Collection(s) to check.")] = Which.all,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Is the warehouse in step with MongoDB? Count both sides now; exit 1 when they differ.

    Counts the documents of each collection in MongoDB and the ones the warehouse accounts for
    (live rows of raw.<collection> plus rejected documents), leaving out documents younger than
    LOADER_OVERLAP_SECONDS. Changes nothing; `python -m loader reconcile` (or the next flow
    run) repairs a difference. Equal counts do not prove equal contents: reconcile compares
    every id and updated_at."""
    from loader.drift import measure_drift
    from loader.sync import prepare_clients

    _setup_logging(verbose)
    settings = _settings()
    try:
        with open_clients(settings) as clients:
            prepare_clients(clients)
            drifts = [measure_drift(clients, name) for name in _collections(collection)]
    except ServerUnavailable as exc:
        raise _fail(exc) from exc
    table = Table(title="in step with MongoDB?")
    for col in ("collection", "MongoDB", "warehouse", "state"):
        table.add_column(col, justify="left" if col in ("collection", "state") else "right")
    for d in drifts:
        state = "[green]in step[/]" if d.in_step else f"[bold red]{d.differ:,} differ[/]"
        table.add_row(d.collection, f"{d.mongo_count:,}", f"{d.clickhouse_count:,}", state)
    console.print(table)
    console.print(f"documents created before {d.counted_before:%Y-%m-%d %H:%M:%S} UTC counted")
    if not all(d.in_step for d in drifts):
        console.print("repair: `python -m loader reconcile`, then `make sync` rebuilds the models")
        raise typer.Exit(code=1)


@app.command()
def seed(
    tasks: Annotated[int, typer.Option(min=0, help="Number of task documents.")] = 10_000,
    seed_: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same data).")] = 0,
    malformed_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of malformed task documents.")
    ] = 0.0,
    batch: Annotated[int, typer.Option(min=1, help="Documents per insert_many.")] = 10_000,
    live: Annotated[
        bool, typer.Option("--live", help="End the data at the current time (default: fixed date).")
    ] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Do not drop the existing collections first.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Drop the collections even on a MongoDB the embedded stack did not start "
            "(without it, seed refuses to drop anything there).",
        ),
    ] = False,
    activity: Annotated[
        bool, typer.Option("--activity", help="Then keep mutating the data until Ctrl-C.")
    ] = False,
    per_tick: Annotated[int, typer.Option(min=1, help="Activity: changes per tick.")] = 100,
    interval: Annotated[
        float, typer.Option(min=0.0, help="Activity: seconds between ticks.")
    ] = 1.0,
    ticks: Annotated[int | None, typer.Option(min=1, help="Activity: stop after N ticks.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Create the deterministic synthetic dataset in MONGO_DB (and optionally keep it busy).

    It first drops tasks, employee and _synthetic in MONGO_DB: only on a MongoDB started by the
    embedded stack (`python -m devstack up`), unless --force; --keep drops nothing."""
    from pymongo import MongoClient

    import synthetic

    _setup_logging(verbose)
    settings = _settings()
    client: MongoClient = MongoClient(
        settings.mongo_uri, serverSelectionTimeoutMS=int(settings.connect_timeout_seconds * 1000)
    )
    db = client[settings.mongo_db]
    try:
        if tasks:
            with console.status(f"seeding {tasks:,} tasks into {settings.mongo_db}"):
                result = synthetic.seed(
                    db,
                    tasks,
                    seed=seed_,
                    malformed_ratio=malformed_ratio,
                    batch=batch,
                    end=datetime.now(UTC) if live else None,
                    drop=not keep,
                    force=force,
                )
            console.print(
                f"seeded {result.tasks:,} tasks ({result.files:,} files), "
                f"{result.employees:,} employees, malformed: {result.malformed or 'none'}"
            )
        if activity:
            console.print(f"activity: {per_tick} changes every {interval}s (Ctrl-C to stop)")
            try:
                synthetic.activity(
                    db,
                    seed=seed_,
                    per_tick=per_tick,
                    interval_s=interval,
                    ticks=ticks,
                    on_tick=lambda i, r: console.print(
                        f"tick {i}: {r.updated} updated, {r.inserted} inserted"
                    ),
                )
            except KeyboardInterrupt:
                console.print("activity stopped")
    except synthetic.NotAnEmbeddedServer as exc:
        raise _fail(
            errors.ActionableError(
                "refusing to drop the collections tasks, employee and _synthetic of database "
                f"{exc.database!r} (MONGO_DB) on the MongoDB at {settings.redacted_mongo_uri()} "
                f"(MONGO_URI, {exc.server}): {exc.reason}. "
                "seed replaces those collections, so it does that only on a server "
                "the embedded stack started. If that server holds nothing you need, re-run with "
                "--force; to add the synthetic data without dropping anything, use --keep; to seed "
                "the embedded stack, point MONGO_URI at it (`python -m devstack up` prints it).",
                "MONGO_URI",
            )
        ) from None
    except Exception as exc:
        if type(exc).__module__.startswith("pymongo"):
            raise _fail(exc) from exc  # one line naming MONGO_URI (loader.errors)
        raise
    finally:
        client.close()


def main() -> None:
    """`python -m loader`: what escapes a command is reported as one line (`loader.errors`)."""
    errors.run_cli(app, verbose=lambda: _verbose)
