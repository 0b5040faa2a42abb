"""Errors a person can act on: one line naming the variable to fix.

`classify(exc)` recognises the failures an operator fixes outside the code: a server that does
not answer, credentials a server refuses, a setting that does not validate, dbt without a
usable connection. It returns a `Problem` whose message is one line naming the env var(s) to
fix; anything else is a bug or a data problem and returns None. `run_cli` is the wrapper of
every command line (`loader`, `flows.pipeline`, `flows.serve`, `flows.dashboard`): a known
problem prints `error: <that line>` on stderr and exits 2, anything else prints its message
and exits 1, and only `--verbose` adds the traceback.

A failed sync also says whether its watermark moved (`watermark_outcome`, attached to the
exception as a note, so every layer that reports the exception reports it too).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from loader.watermark import Watermark

# For every command line's --help.
CLI_HELP = (
    "An unreachable server, refused credentials or a bad setting print one line on stderr"
    " naming the variable to fix and exit with code 2 (other failures: 1); --verbose adds the"
    " traceback."
)


def cli_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of a project command: the error-reporting epilog and `--verbose`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=CLI_HELP)
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="on failure, print the traceback too"
    )
    return parser


EXIT_PROBLEM = 2  # an actionable problem: fix the named variable or server
EXIT_FAILED = 1  # anything else

MONGO_HINT = "`make up` starts the embedded stack"
# ClickHouse error codes of refused credentials or missing grants.
CLICKHOUSE_AUTH_CODES = {
    192: "UNKNOWN_USER",
    193: "WRONG_PASSWORD",
    194: "REQUIRED_PASSWORD",
    516: "AUTHENTICATION_FAILED",
}
CLICKHOUSE_ACCESS_DENIED = 497
# MongoDB error codes: 18 AuthenticationFailed, 13 Unauthorized (a missing role).
MONGO_AUTH_FAILED = 18
MONGO_UNAUTHORIZED = 13


class ActionableError(RuntimeError):
    """An error whose message already names what to fix (raised by the pipeline itself)."""

    def __init__(self, message: str, variables: str, kind: str = "settings", server: str = ""):
        super().__init__(message)
        self.variables = variables
        self.kind = kind
        self.server = server


@dataclass(frozen=True)
class Problem:
    kind: str  # "unreachable", "auth", "settings", "dbt"
    server: str  # "MongoDB", "ClickHouse", "Redis", "dbt", or "" (a setting)
    variables: str  # the env var(s) to fix
    message: str  # one line


# --- classification ---------------------------------------------------------------------------


def classify(exc: BaseException) -> Problem | None:
    """The actionable problem behind `exc` (itself or what caused it), or None."""
    for err in _chain(exc):
        problem = _classify_one(err)
        if problem is not None:
            return problem
    return None


def describe(exc: BaseException) -> str:
    """One line for `exc`: the problem (or type and first line of the message) and, for a
    failed sync, whether the watermark moved."""
    problem = classify(exc)
    text = problem.message if problem else f"{type(exc).__name__}: {_first_line(exc)}"
    notes = watermark_notes(exc)
    return one_line("; ".join([text.rstrip("."), *notes]) + ".")


def failure_message(exc: BaseException, note: str = "") -> str:
    """The message of a failed run's record: the problem's line (or the exception's type and
    whole message), then `note` (whether the watermark moved)."""
    problem = classify(exc)
    text = problem.message if problem else redact(f"{type(exc).__name__}: {exc}")
    return f"{text.rstrip('.')}; {note}" if note else text


def one_line(text: str) -> str:
    return redact(" ".join(str(text).split()))


def redact(text: str) -> str:
    """Hide the password of any `scheme://user:password@host` in `text`."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]*@", r"\1***@", text)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__  # explicit `raise ... from`: what this error wraps


def _classify_one(exc: BaseException) -> Problem | None:
    if isinstance(exc, ActionableError):
        return Problem(exc.kind, exc.server, exc.variables, one_line(str(exc)))
    for check in (_settings, _loader, _mongo, _clickhouse, _redis, _dbt, _prefect):
        problem = check(exc)
        if problem is not None:
            return problem
    return None


def _settings(exc: BaseException) -> Problem | None:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return None
    parts, names = [], []
    for error in exc.errors():
        name = env_var_name(exc.title, error.get("loc", ()))
        msg = re.sub(r"^(Value|Assertion) error, ", "", str(error.get("msg", "")))
        parts.append(f"{name}: {msg}" if name else msg)
        if name:
            names.append(name)
    label = "invalid setting" if len(parts) == 1 else "invalid settings"
    return Problem(
        "settings",
        "",
        ", ".join(dict.fromkeys(names)),
        one_line(f"{label} {'; '.join(parts)} (fix or unset the variable)"),
    )


def env_var_name(model: str, loc: Sequence[Any]) -> str:
    """The env var behind a pydantic-settings error location: the field's alias, or its name
    with the model's `env_prefix` (`task_retries` of FlowSettings -> PIPELINE_TASK_RETRIES)."""
    if not loc:
        return ""
    name = str(loc[0])
    cls = _settings_class(model)
    field = cls.model_fields.get(name) if cls is not None else None
    if cls is None or field is None:
        return name if name.isupper() else name.upper()
    alias = field.validation_alias
    if isinstance(alias, str):
        return alias
    choices = [c for c in getattr(alias, "choices", ()) if isinstance(c, str)]
    upper = [c for c in choices if c.isupper()]
    if upper:
        return upper[0]
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def _settings_class(title: str) -> Any:
    from pydantic_settings import BaseSettings

    stack = list(BaseSettings.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls.__name__ == title:
            return cls
        stack.extend(cls.__subclasses__())
    return None


def _loader(exc: BaseException) -> Problem | None:
    from loader.clients import ServerUnavailable

    if not isinstance(exc, ServerUnavailable):
        return None
    waited = f" within {exc.elapsed_s:.1f} s" if exc.elapsed_s is not None else ""
    return Problem(
        "unreachable",
        exc.server,
        exc.env_vars,
        one_line(
            f"{exc.server} at {exc.address} did not answer{waited} ({exc.reason}): check "
            f"{exc.env_vars} and that the server is running ({MONGO_HINT})"
        ),
    )


def _mongo(exc: BaseException) -> Problem | None:
    # A connection string pymongo cannot parse raises a plain ValueError from its parser.
    uri_error = _raised_in(exc, r"pymongo\.(.*uri_parser.*|common|client_options|.*mongo_client)")
    if not type(exc).__module__.startswith("pymongo") and not uri_error:
        return None
    from pymongo.errors import ConfigurationError, ConnectionFailure, OperationFailure

    where = f"MongoDB at {_env_mongo_uri()}"
    if isinstance(exc, OperationFailure) and exc.code == MONGO_AUTH_FAILED:
        return Problem(
            "auth",
            "MongoDB",
            "MONGO_URI",
            f"{where} refused the credentials (AuthenticationFailed): fix the user, password "
            "or authSource in MONGO_URI",
        )
    if isinstance(exc, OperationFailure) and exc.code == MONGO_UNAUTHORIZED:
        return Problem(
            "auth",
            "MongoDB",
            "MONGO_URI",
            one_line(
                f"{where}: the user is not allowed to do this ({_first_line(exc)[:200]}): "
                "grant it the role or use another user in MONGO_URI"
            ),
        )
    if isinstance(exc, ConnectionFailure):
        return Problem(
            "unreachable",
            "MongoDB",
            "MONGO_URI",
            f"{where} did not answer ({short_reason(exc)}): check MONGO_URI and that the "
            f"server is running ({MONGO_HINT})",
        )
    if isinstance(exc, ConfigurationError) or (
        uri_error and isinstance(exc, ValueError | TypeError)
    ):
        return Problem(
            "settings",
            "MongoDB",
            "MONGO_URI",
            one_line(f"invalid setting MONGO_URI: {_first_line(exc)[:300]}"),
        )
    return None


def _clickhouse(exc: BaseException) -> Problem | None:
    if not type(exc).__module__.startswith("clickhouse_connect"):
        return None
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    text = str(exc)
    where = f"ClickHouse at {_clickhouse_url(text)}"
    if isinstance(exc, OperationalError):
        return Problem(
            "unreachable",
            "ClickHouse",
            "CLICKHOUSE_HOST / CLICKHOUSE_PORT",
            f"{where} did not answer ({short_reason(exc)}): check CLICKHOUSE_HOST / "
            f"CLICKHOUSE_PORT and that the server is running ({MONGO_HINT})",
        )
    if isinstance(exc, DatabaseError):
        code = _clickhouse_code(exc)
        if code in CLICKHOUSE_AUTH_CODES:
            user = os.environ.get("CLICKHOUSE_USER") or "default"
            return Problem(
                "auth",
                "ClickHouse",
                "CLICKHOUSE_USER / CLICKHOUSE_PASSWORD",
                f"{where} refused user {user!r} ({CLICKHOUSE_AUTH_CODES[code]}): check "
                "CLICKHOUSE_USER / CLICKHOUSE_PASSWORD",
            )
        if code == CLICKHOUSE_ACCESS_DENIED:
            return Problem(
                "auth",
                "ClickHouse",
                "CLICKHOUSE_USER",
                one_line(
                    f"{where}: the user lacks a grant (ACCESS_DENIED: "
                    f"{_server_message(text)[:200]}): grant it or set another CLICKHOUSE_USER"
                ),
            )
    return None


def _redis(exc: BaseException) -> Problem | None:
    url_error = _raised_in(exc, r"redis\.(connection|utils|client)")  # from_url's parser
    if not type(exc).__module__.startswith("redis") and not url_error:
        return None
    import redis

    url = redact(_configured("redis_url"))
    if isinstance(exc, redis.AuthenticationError):
        return Problem(
            "auth",
            "Redis",
            "REDIS_URL",
            f"Redis at {url} refused the credentials: fix the password in REDIS_URL",
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return Problem(
            "unreachable",
            "Redis",
            "REDIS_URL",
            f"Redis at {url} did not answer ({short_reason(exc)}): check REDIS_URL and that "
            f"the server is running ({MONGO_HINT})",
        )
    if url_error and isinstance(exc, ValueError):
        return Problem(
            "settings",
            "Redis",
            "REDIS_URL",
            one_line(f"invalid setting REDIS_URL: {_first_line(exc)[:300]}"),
        )
    return None


# dbt's own errors, as `flows.dbt_build` reports them.
DBT_PROFILE = re.compile(
    r"DbtProfileError|Could not find profile|profiles\.yml|does not have a target named|"
    r"DbtUsageException: Path .* does not exist|Env var required but not provided",
    re.IGNORECASE,
)
DBT_CONNECT = re.compile(r"FailedToConnectError|connection refused|Max retries exceeded", re.I)


def _prefect(exc: BaseException) -> Problem | None:
    """A flow run without PREFECT_API_URL starts a temporary Prefect server first; on a busy
    machine it may not answer within Prefect's startup timeout."""
    if not (isinstance(exc, RuntimeError) and "ephemeral Prefect API server" in str(exc)):
        return None
    variables = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, PREFECT_API_URL"
    return Problem(
        "unreachable",
        "Prefect",
        variables,
        "the flow's temporary Prefect server did not start in time (a busy machine): run "
        "again, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point "
        "PREFECT_API_URL at a running Prefect server (`make serve` runs one); nothing was "
        "loaded or built",
    )


def _dbt(exc: BaseException) -> Problem | None:
    if type(exc).__name__ not in {"DbtBuildError", "DbtConnectionError"}:
        return None
    text = str(exc)
    profile_vars = "profiles.yml (PIPELINE_DBT_PROFILES_DIR, DBT_TARGET)"
    if DBT_PROFILE.search(text):
        return Problem(
            "dbt",
            "dbt",
            profile_vars,
            one_line(
                f"dbt could not load its connection profile ({_dbt_reason(text)}): check "
                f"{profile_vars}; `make setup` writes profiles.yml from profiles.yml.example"
            ),
        )
    if re.search(r"AUTHENTICATION_FAILED|Code: (516|192|193|194)\b", text):
        return Problem(
            "dbt",
            "dbt",
            "CLICKHOUSE_USER / CLICKHOUSE_PASSWORD",
            f"dbt: ClickHouse at {_clickhouse_url(text)} refused the credentials: check "
            f"CLICKHOUSE_USER / CLICKHOUSE_PASSWORD (read by {profile_vars})",
        )
    if type(exc).__name__ == "DbtConnectionError" or DBT_CONNECT.search(text):
        return Problem(
            "dbt",
            "dbt",
            "CLICKHOUSE_HOST / CLICKHOUSE_PORT",
            one_line(
                f"dbt could not connect to ClickHouse at {_clickhouse_url(text)} "
                f"({short_reason(exc)}): check CLICKHOUSE_HOST / CLICKHOUSE_PORT (read by "
                f"{profile_vars}) and that the server is running ({MONGO_HINT})"
            ),
        )
    return None


def _dbt_reason(text: str) -> str:
    head, _, rest = text.partition(": ")
    reason = rest or head
    reason = re.sub(r"^\w+(Error|Exception): ", "", reason)
    reason = re.sub(r"^(Runtime Error|Compilation Error)\s+", "", reason.strip())
    return one_line(reason)[:200]


def short_reason(exc: BaseException) -> str:
    """What went wrong on the wire, in a few words."""
    text = str(exc)
    patterns = (
        (r"Connection refused", "connection refused"),
        (
            r"Name or service not known|Failed to resolve|nodename nor servname|getaddrinfo",
            "host name not found",
        ),
        (r"No route to host|Network is unreachable", "no route to host"),
        (r"timed out|Timeout", "timed out"),
        (r"Connection reset|Remote end closed|connection closed", "connection lost"),
    )
    for pattern, label in patterns:
        if re.search(pattern, text, re.IGNORECASE):
            return label
    return f"{type(exc).__name__}: {_first_line(exc)[:120]}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _raised_in(exc: BaseException, module_pattern: str) -> bool:
    """True when the innermost frame of `exc`'s traceback is in a module matching the regex."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return re.fullmatch(module_pattern, module) is not None


def _clickhouse_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    match = re.search(r"\bcode: (\d+)", str(exc), re.IGNORECASE)
    return int(match.group(1)) if match else None


def _clickhouse_url(text: str) -> str:
    match = re.search(r"\((?:for url )?(https?://[^)\s]+)\)", text)
    if match:
        return match.group(1)
    return f"http://{_configured('clickhouse_host')}:{_configured('clickhouse_port')}"


def _server_message(text: str) -> str:
    return text.split("DB::Exception: ", 1)[-1]


def _configured(field: str) -> str:
    """A connection setting as the environment gives it, else its default, unvalidated (the
    error being described may be that it does not validate)."""
    from loader.settings import ConnectionSettings

    info = ConnectionSettings.model_fields[field]
    return os.environ.get(str(info.validation_alias)) or str(info.default)


def _env_mongo_uri() -> str:
    return redact(_configured("mongo_uri"))


# --- the watermark of a failed sync -----------------------------------------------------------

WATERMARK_NOTE = re.compile(r"\bwatermarks? of .*?\b(did not move|moved to)\b")


def watermark_outcome(
    collection: str, before: Watermark | None, reached: Watermark | None
) -> tuple[Watermark | None, str]:
    """Where the watermark of a sync that failed now is, and a sentence saying so.

    `reached` is the last watermark the run saved (None if it saved none); a save never moves
    the stored watermark back, so the watermark moved only if `reached` is past `before`."""

    def key(wm: Watermark) -> tuple[int, str]:
        return (wm.updated_at_ms, wm.last_id)

    if reached is not None and (before is None or key(reached) > key(before)):
        start = before.describe() if before is not None else "none"
        return reached, (
            f"the watermark of {collection} moved to {reached.describe()} (from {start}) with "
            "the batches stored before the failure; the next run resumes there"
        )
    where = f" (still {before.describe()})" if before is not None else " (none stored yet)"
    return before, f"the watermark of {collection} did not move{where}"


def watermark_unmoved(collections: Sequence[str]) -> str:
    names = ", ".join(collections)
    return f"the watermark{'s' if len(collections) > 1 else ''} of {names} did not move"


def add_note(exc: BaseException, note: str) -> None:
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def watermark_notes(exc: BaseException) -> list[str]:
    """The watermark notes attached to `exc` or to what it wraps."""
    notes: list[str] = []
    for err in _chain(exc):
        for note in getattr(err, "__notes__", ()):
            if WATERMARK_NOTE.search(note) and note not in notes:
                notes.append(note)
    return notes


# --- command lines ----------------------------------------------------------------------------


def report(exc: BaseException, *, verbose: bool = False, stream: TextIO | None = None) -> int:
    """Print `exc` for a person on stderr; return the exit code (2: actionable, 1: other)."""
    out = stream or sys.stderr
    if verbose:
        traceback.print_exception(exc, file=out)
    problem = classify(exc)
    if problem is not None:
        print(f"error: {describe(exc)}", file=out)
    else:  # not one of the known problems: the whole message, which may span lines
        notes = "".join(f"\n{note}" for note in watermark_notes(exc))
        print(f"error: {redact(f'{type(exc).__name__}: {exc}')}{notes}", file=out)
        if not verbose:
            print("(run with --verbose for the traceback)", file=out)
    out.flush()
    return EXIT_PROBLEM if problem is not None else EXIT_FAILED


def run_cli(entry: Callable[[], object], verbose: bool | Callable[[], bool] = False) -> None:
    """Run a command line's body; report what escapes it (see `report`) and exit with its code.

    `verbose` may be a callable, read after the failure (a CLI that learns it while parsing)."""
    try:
        entry()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a report
        is_verbose = verbose() if callable(verbose) else verbose
        raise SystemExit(report(exc, verbose=is_verbose)) from None


class _NoTraceback(logging.Formatter):
    """Formats like the wrapped formatter, without the traceback of the record."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextmanager
def console_logs_without_tracebacks(enabled: bool = True) -> Iterator[None]:
    """Console log handlers (Prefect's included) print records without their tracebacks;
    other handlers (Prefect's API log handler) still get them."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    wrapped: list[tuple[logging.Handler, logging.Formatter | None]] = []
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler.formatter, _NoTraceback
            ):
                wrapped.append((handler, handler.formatter))
                handler.setFormatter(_NoTraceback(handler.formatter))
    try:
        yield
    finally:
        for handler, formatter in wrapped:
            handler.setFormatter(formatter)


def quiet_driver_logs(verbose: bool) -> None:
    """Without --verbose, the drivers' own retry chatter (clickhouse-connect, urllib3) stays out
    of the output: the error line says what failed."""
    if not verbose:
        for name in ("clickhouse_connect", "urllib3"):
            logging.getLogger(name).setLevel(logging.ERROR)
