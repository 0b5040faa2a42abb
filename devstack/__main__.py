"""`python -m devstack up|down|status`: the embedded MongoDB, ClickHouse and Redis."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from devstack.process import StackError
from devstack.service import Outcome
from devstack.settings import StackSettings
from devstack.stack import DEFAULT_PORTS, SERVICES, Stack

app = typer.Typer(
    help=(
        "The embedded stack for development, tests and CI: real MongoDB 6.0 (replica set rs0), "
        "ClickHouse (chdb behind ClickHouse's HTTP interface) and Redis, each from a PyPI wheel. "
        "Data, logs and pid files live under the data dir. A contract env var that is set "
        "(MONGO_URI, CLICKHOUSE_HOST, REDIS_URL) means 'use that server': up/down leave that "
        "part alone."
    ),
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="PIPELINE_DATA_DIR",
        help="Where data, logs (logs/) and pid files (run/) live.",
    ),
]
MongoPort = Annotated[int, typer.Option(help="MongoDB port on 127.0.0.1.")]
ClickHousePort = Annotated[int, typer.Option(help="ClickHouse HTTP port on 127.0.0.1.")]
RedisPort = Annotated[int, typer.Option(help="Redis port on 127.0.0.1.")]


def _stack(data_dir: Path, mongo_port: int, clickhouse_port: int, redis_port: int):
    settings = StackSettings()
    ports = {"mongo": mongo_port, "clickhouse": clickhouse_port, "redis": redis_port}
    stack = Stack(
        data_dir,
        mongo_port=mongo_port,
        clickhouse_port=clickhouse_port,
        redis_port=redis_port,
        clickhouse_password=settings.clickhouse_password or None,
        clickhouse_user=settings.clickhouse_user,
    )
    external = settings.external(ports)
    for name, why in external.items():
        out.print(f"[yellow]{name}[/]: external ({why}); not managed here")
    embedded = [name for name in SERVICES if name not in external]
    return stack, embedded, external


def _ports(stack: Stack) -> dict[str, int]:
    return {
        "mongo": stack.mongo_port,
        "clickhouse": stack.clickhouse_port,
        "redis": stack.redis_port,
    }


def _fail(exc: StackError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    return typer.Exit(code=1)


def _outcome_table(stack: Stack, outcomes: list[Outcome], external: dict[str, str]) -> Table:
    table = Table(title=f"embedded stack ({stack.data_dir})")
    for column in ("service", "state", "pid"):
        table.add_column(column)
    # fold, never truncate: the connection strings are there to be copied.
    table.add_column("connection", overflow="fold")
    by_name = {o.name: o for o in outcomes}
    for name in SERVICES:
        if name in external:
            table.add_row(name, "external", "", external[name])
        elif name in by_name:
            o = by_name[name]
            table.add_row(name, o.action, str(o.pid or ""), o.url)
    return table


@app.command()
def up(
    data_dir: DataDir = Path(".data"),
    mongo_port: MongoPort = DEFAULT_PORTS["mongo"],
    clickhouse_port: ClickHousePort = DEFAULT_PORTS["clickhouse"],
    redis_port: RedisPort = DEFAULT_PORTS["redis"],
) -> None:
    """Start every embedded server that is not running yet; wait until each answers."""
    stack, embedded, external = _stack(data_dir, mongo_port, clickhouse_port, redis_port)
    try:
        with out.status(f"starting {', '.join(embedded) or 'nothing'} ..."):
            outcomes = stack.up(embedded)
    except StackError as exc:
        raise _fail(exc) from None
    out.print(_outcome_table(stack, outcomes, external))
    out.print(f"logs: {stack.data_dir / 'logs'}")
    if any(port != DEFAULT_PORTS[name] for name, port in _ports(stack).items()):
        # Not the default ports: the pipeline finds this stack only through the env vars.
        out.print("point the pipeline at it with:")
        for name, value in stack.env.items():
            out.print(f"  export {name}={shlex.quote(value)}", soft_wrap=True, highlight=False)


@app.command()
def down(
    data_dir: DataDir = Path(".data"),
    mongo_port: MongoPort = DEFAULT_PORTS["mongo"],
    clickhouse_port: ClickHousePort = DEFAULT_PORTS["clickhouse"],
    redis_port: RedisPort = DEFAULT_PORTS["redis"],
) -> None:
    """Stop the embedded servers cleanly; their data stays in the data dir."""
    stack, embedded, external = _stack(data_dir, mongo_port, clickhouse_port, redis_port)
    try:
        outcomes = stack.down(embedded)
    except StackError as exc:
        raise _fail(exc) from None
    for o in reversed(outcomes):
        out.print(f"{o.name}: {o.action}" + (f" (pid {o.pid})" if o.pid else ""))


@app.command()
def status(
    data_dir: DataDir = Path(".data"),
    mongo_port: MongoPort = DEFAULT_PORTS["mongo"],
    clickhouse_port: ClickHousePort = DEFAULT_PORTS["clickhouse"],
    redis_port: RedisPort = DEFAULT_PORTS["redis"],
) -> None:
    """Show each server: running or not, pid, port, connection string."""
    stack, _, external = _stack(data_dir, mongo_port, clickhouse_port, redis_port)
    table = Table(title=f"embedded stack ({stack.data_dir})")
    for column in ("service", "state", "pid", "port"):
        table.add_column(column)
    table.add_column("connection", overflow="fold")
    table.add_column("note", overflow="fold")
    for s in stack.status():
        if s.name in external:
            table.add_row(s.name, "external", "", "", external[s.name], "")
            continue
        state = "[green]running[/]" if s.running else "[dim]stopped[/]"
        table.add_row(s.name, state, str(s.pid or ""), str(s.port), s.url, s.note)
    out.print(table)


if __name__ == "__main__":
    app()
