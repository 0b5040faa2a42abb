"""`python -m devstack up|down|status`: the embedded MongoDB, ClickHouse and Redis."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from devstack.process import StackError, port_is_free, port_owner
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
# Outside a terminal (CI logs, pipes) rich would assume 80 columns and fold the URLs.
ENV_PREFIX = {"mongo": "MONGO_", "clickhouse": "CLICKHOUSE_", "redis": "REDIS_"}
out = Console() if sys.stdout.isatty() else Console(width=120)
err = Console(stderr=True)

DEFAULT_DATA_DIR = Path(".data")
DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="PIPELINE_DATA_DIR",
        help="Where data, logs (logs/) and pid files (run/) live.",
    ),
]
PORT_HELP = " Default: the port in {var} if it points at 127.0.0.1/localhost, else {port}."
MongoPort = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=65535,
        help="MongoDB port on 127.0.0.1." + PORT_HELP.format(var="MONGO_URI", port=27017),
        show_default=False,
    ),
]
ClickHousePort = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=65535,
        help="ClickHouse HTTP port on 127.0.0.1."
        + PORT_HELP.format(var="CLICKHOUSE_HOST/CLICKHOUSE_PORT", port=8123),
        show_default=False,
    ),
]
RedisPort = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=65535,
        help="Redis port on 127.0.0.1." + PORT_HELP.format(var="REDIS_URL", port=6379),
        show_default=False,
    ),
]


def _stack(
    data_dir: Path, mongo_port: int | None, clickhouse_port: int | None, redis_port: int | None
) -> tuple[Stack, list[str], dict[str, str]]:
    """The stack to manage, the embedded parts in it, and the external ones (with the reason).

    Ports: the option if given, else the port of a contract env var that points at this
    machine, else the default.
    """
    try:
        settings = StackSettings()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            err.print(f"[bold red]configuration error:[/] {where}: {message}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    local = settings.local_ports()
    given = {"mongo": mongo_port, "clickhouse": clickhouse_port, "redis": redis_port}
    ports = {
        name: port if port is not None else local.get(name, DEFAULT_PORTS[name])
        for name, port in given.items()
    }
    stack = Stack(
        data_dir,
        mongo_port=ports["mongo"],
        clickhouse_port=ports["clickhouse"],
        redis_port=ports["redis"],
        clickhouse_password=settings.clickhouse_password.get_secret_value() or None,
        clickhouse_user=settings.clickhouse_user,
    )
    external = settings.external(ports)
    for name, why in settings.configured().items():
        service = stack.service(name)
        if name in external or service.pidfile.live() is not None:
            continue
        if not port_is_free(service.port):
            # The env var points here and a server we did not start answers: use it as it is.
            owner = port_owner(service.port) or "another process"
            external[name] = f"{why}; already served by {owner}"
    for name, why in external.items():
        out.print(f"[yellow]{name}[/]: external ({why}); not managed here", soft_wrap=True)
    embedded = [name for name in SERVICES if name not in external]
    return stack, embedded, external


def _ports(stack: Stack) -> dict[str, int]:
    return {
        "mongo": stack.mongo_port,
        "clickhouse": stack.clickhouse_port,
        "redis": stack.redis_port,
    }


def _exports(stack: Stack, embedded: list[str]) -> dict[str, str]:
    """The env vars that `down`, `status`, the loader and dbt need to find this stack: the
    embedded parts' connection vars when a port is not the default, and PIPELINE_DATA_DIR when
    the data dir is not the default (`.data` here)."""
    exports: dict[str, str] = {}
    if not embedded:
        return exports
    if any(_ports(stack)[name] != DEFAULT_PORTS[name] for name in embedded):
        prefixes = tuple(ENV_PREFIX[name] for name in embedded)
        exports.update({k: v for k, v in stack.env.items() if k.startswith(prefixes)})
    if stack.data_dir.resolve() != DEFAULT_DATA_DIR.resolve():
        exports["PIPELINE_DATA_DIR"] = str(stack.data_dir)
    return exports


def _nothing_here(stack: Stack, embedded: list[str]) -> str:
    """What to say when no embedded server runs from this data dir: where we looked, what else
    holds the ports, and how to point the command at another data dir."""
    run_dir = stack.data_dir / "run"
    looked = f"pid files under {run_dir}" + ("" if stack.data_dir.is_dir() else "; no such dir")
    busy = [
        f"port {stack.service(name).port} ({name}) is held by "
        f"{port_owner(stack.service(name).port) or 'another process'}"
        for name in embedded
        if not port_is_free(stack.service(name).port)
    ]
    return (
        f"no embedded server is running from {stack.data_dir} ({looked})"
        + (f"; {'; '.join(busy)}" if busy else "")
        + ". If you started the stack with another --data-dir or PIPELINE_DATA_DIR, pass the "
        "same one (`python -m devstack up` prints it)."
    )


def _fail(exc: StackError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    return typer.Exit(code=1)


def _act(action: Callable[[list[str]], list[Outcome]], embedded: list[str]) -> list[Outcome]:
    """`stack.up` or `stack.down` on the embedded parts; a stack error is one red line."""
    try:
        return action(embedded)
    except StackError as exc:
        raise _fail(exc) from None


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
    data_dir: DataDir = DEFAULT_DATA_DIR,
    mongo_port: MongoPort = None,
    clickhouse_port: ClickHousePort = None,
    redis_port: RedisPort = None,
) -> None:
    """Start every embedded server that is not running yet; wait until each answers."""
    stack, embedded, external = _stack(data_dir, mongo_port, clickhouse_port, redis_port)
    with out.status(f"starting {', '.join(embedded) or 'nothing'} ..."):
        outcomes = _act(stack.up, embedded)
    out.print(_outcome_table(stack, outcomes, external))
    out.print(f"logs: {stack.data_dir / 'logs'}")
    exports = _exports(stack, embedded)
    if exports:
        # Not the defaults: the pipeline and `down` find this stack only through these.
        out.print("point the pipeline (and `python -m devstack down`) at it with:")
        for name, value in exports.items():
            out.print(f"  export {name}={shlex.quote(value)}", soft_wrap=True, highlight=False)


@app.command()
def down(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    mongo_port: MongoPort = None,
    clickhouse_port: ClickHousePort = None,
    redis_port: RedisPort = None,
) -> None:
    """Stop the embedded servers cleanly; their data stays in the data dir."""
    stack, embedded, external = _stack(data_dir, mongo_port, clickhouse_port, redis_port)
    outcomes = _act(stack.down, embedded)
    for o in reversed(outcomes):
        out.print(f"{o.name}: {o.action}" + (f" (pid {o.pid})" if o.pid else ""))
    if embedded and all(o.action == "not running" for o in outcomes):
        out.print(f"[yellow]{escape(_nothing_here(stack, embedded))}[/]", soft_wrap=True)


@app.command()
def status(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    mongo_port: MongoPort = None,
    clickhouse_port: ClickHousePort = None,
    redis_port: RedisPort = None,
) -> None:
    """Show each server: running or not, pid, port, connection string."""
    stack, embedded, external = _stack(data_dir, mongo_port, clickhouse_port, redis_port)
    table = Table(title=f"embedded stack ({stack.data_dir})")
    for column in ("service", "state", "pid", "port"):
        table.add_column(column)
    table.add_column("connection", overflow="fold")
    table.add_column("note", overflow="fold")
    statuses = stack.status()
    for s in statuses:
        if s.name in external:
            table.add_row(s.name, "external", "", "", external[s.name], "")
            continue
        state = "[green]running[/]" if s.running else "[dim]stopped[/]"
        table.add_row(s.name, state, str(s.pid or ""), str(s.port), s.url, s.note)
    out.print(table)
    if embedded and not any(s.running for s in statuses if s.name in embedded):
        out.print(f"[yellow]{escape(_nothing_here(stack, embedded))}[/]", soft_wrap=True)


if __name__ == "__main__":
    app()
