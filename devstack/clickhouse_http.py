"""ClickHouse's HTTP interface in front of one embedded chdb session.

chdb (the ClickHouse engine in-process) lets only one process open a data directory, so this
small server owns the session and speaks the HTTP protocol that clickhouse-connect, dbt-clickhouse
and curl use against a real ClickHouse server.

    python -m devstack.clickhouse_http --data-dir .data/clickhouse --port 8123

All engine work is serialized by one lock (chdb runs one statement at a time per session);
`/ping` never takes it. URL settings and `database` are applied just for their request and then
restored; `SET`/`USE` sent with a `session_id` are remembered for that session, like a server does.

Requests are held to ClickHouse's default limits, answered as ClickHouse answers them: a URL up
to 1 MiB (`http_max_uri_size`), and each header name or value, URL parameter or form field up to
128 KiB (`http_max_field_name_size`, `http_max_field_value_size`); see HTTP_MAX_URI_SIZE.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

import anyio
import pyarrow as pa
import uvicorn
from anyio.to_thread import run_sync
from chdb import session as chdb_session
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from devstack.http_codecs import (
    Decoder,
    UnsupportedEncodingError,
    choose_response_encoding,
    request_decoder,
    response_encoder,
)

log = logging.getLogger("devstack.clickhouse_http")

# URL parameters the HTTP handler consumes itself; everything else is a ClickHouse setting.
HANDLER_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "user",
        "password",
        "quota_key",
        "buffer_size",
        "wait_end_of_query",
        "compress",
        "decompress",
        "client_protocol_version",
        "role",
        "stacktrace",
        "add_http_cors_header",
        "http_native_compression_disable_checksumming_on_decompress",
        # Real settings that only steer the HTTP layer, which we handle (or ignore) here.
        "enable_http_compression",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "http_wait_end_of_query",
        "http_response_buffer_size",
        "cancel_http_readonly_queries_on_client_close",
        # readonly=1 would forbid restoring the other settings afterwards; not emulated.
        "readonly",
    }
)

# Formats whose per-block outputs concatenate into one valid stream; chdb renders every
# streamed block as a complete document, so other formats (JSON, *WithNames, Parquet, Pretty,
# ...) are produced in one piece, and Arrow/ArrowStream are re-framed batch by batch.
STREAMABLE_FORMATS = frozenset(
    name.lower()
    for name in (
        "Native",
        "RowBinary",
        "TabSeparated",
        "TSV",
        "TabSeparatedRaw",
        "TSVRaw",
        "CSV",
        "JSONEachRow",
        "JSONStringsEachRow",
        "JSONCompactEachRow",
        "JSONCompactStringsEachRow",
        "NDJSON",
        "JSONLines",
        "Values",
        "LineAsString",
        "RawBLOB",
        "Null",
    )
)
ARROW_FORMATS = {"arrow": "file", "arrowstream": "stream"}

# ClickHouse's own mapping from error code to HTTP status (a subset; the rest are 500).
HTTP_STATUS_BY_CODE = {
    62: 400,  # SYNTAX_ERROR
    27: 400,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    26: 400,  # CANNOT_PARSE_QUOTED_STRING
    6: 400,  # CANNOT_PARSE_TEXT
    72: 400,  # CANNOT_PARSE_NUMBER
    73: 400,  # UNKNOWN_FORMAT
    115: 400,  # UNKNOWN_SETTING
    456: 400,  # UNKNOWN_QUERY_PARAMETER
    457: 400,  # BAD_QUERY_PARAMETER
    60: 404,  # UNKNOWN_TABLE
    81: 404,  # UNKNOWN_DATABASE
    46: 404,  # UNKNOWN_FUNCTION
    47: 404,  # UNKNOWN_IDENTIFIER
    16: 404,  # NO_SUCH_COLUMN_IN_TABLE
    194: 401,  # REQUIRED_PASSWORD
    516: 403,  # AUTHENTICATION_FAILED
}

_CODE_RE = re.compile(r"Code: (\d+)\. ")
# "Code: 73. DB::Exception: Code: 73. DB::Exception: msg (version v). (NAME)" -> inner message
_NESTED_RE = re.compile(
    r"^Code: \d+\. DB::Exception: (Code: \d+\. DB::Exception: .*)"
    r" \(version [^)]*\)\. \([A-Z_0-9]+\)$",
    re.DOTALL,
)
_FORMAT_RE = re.compile(
    r"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)\s*(?:SETTINGS\s+.*?)?;?\s*$", re.IGNORECASE | re.DOTALL
)
_INSERT_RE = re.compile(r"^\s*INSERT\s+INTO\b", re.IGNORECASE)
# An INSERT whose data follows the statement: "... FORMAT Name<ws>" or "... VALUES".
_INSERT_DATA_RE = re.compile(
    r"^(?P<stmt>\s*INSERT\s+INTO\b.*?)\s*(?:\bFORMAT\s+(?P<fmt>[A-Za-z][A-Za-z0-9_]*)[ \t]*\r?\n?"
    r"|\b(?P<values>VALUES)\b)",
    re.IGNORECASE | re.DOTALL,
)
_INSERT_DATA_RE_B = re.compile(_INSERT_DATA_RE.pattern.encode(), re.IGNORECASE | re.DOTALL)
_INSERT_RE_B = re.compile(_INSERT_RE.pattern.encode(), re.IGNORECASE)
_SET_RE = re.compile(r"^\s*SET\s+(?!ROLE\b|DEFAULT\s+ROLE\b)", re.IGNORECASE)
_USE_RE = re.compile(r"^\s*USE\s+\S+", re.IGNORECASE)
_STREAMING_UNSUPPORTED = "Streaming query is not supported"
# An INSERT statement at the head of a POST body is at most this long before its data starts.
MAX_STATEMENT_BYTES = 1 << 20
# A query sent in a POST body (not INSERT data) is read whole; refuse absurd sizes.
MAX_QUERY_BYTES = 64 << 20

# ClickHouse's limits on a request, at their defaults (src/Core/Settings.cpp). A size equal to a
# limit is accepted, one byte more is not; sizes are counted as sent (percent-encoded).
# - The request line and headers (src/Server/HTTP/HTTPServerRequest.cpp, ReadHeaders.cpp): over
#   a limit, Poco throws a MessageException ("HTTP request URI invalid or too long", "Too many
#   header fields", "Field name is too long", "Field value is too long") that
#   HTTPServerConnection.cpp answers with a bare `400 Bad Request`: no body, no
#   X-ClickHouse-Exception-Code, `Connection: close`. The reason is only logged.
# - URL parameters and multipart form fields (src/Server/HTTP/HTMLForm.cpp, same settings): an
#   HTMLFormException ("Too many form fields", "Field name too long", "Field value too long")
#   that the query handler reports as an error: status 500, X-ClickHouse-Exception-Code 1000
#   (POCO_EXCEPTION), body "Poco::Exception. Code: 1000, e.code() = 0, HTML Form Exception: ...".
#   So one `param_x` longer than 128 KiB is refused even when the whole URL is under 1 MiB.
HTTP_MAX_URI_SIZE = 1 << 20  # http_max_uri_size
HTTP_MAX_FIELDS = 1_000_000  # http_max_fields
HTTP_MAX_FIELD_NAME_SIZE = 128 << 10  # http_max_field_name_size
HTTP_MAX_FIELD_VALUE_SIZE = 128 << 10  # http_max_field_value_size
# h11 buffers a request's head until it is complete; the default (16 KiB) refused URLs that
# ClickHouse takes. This leaves room for a maximal URI plus 1 MiB of headers, so requests within
# the limits reach RequestHeadLimits and one connection holds at most ~2 MiB of head. A larger
# head (ClickHouse would read up to 1,000,000 headers of 128 KiB) is cut off by h11 itself:
# uvicorn answers 400 "Invalid HTTP request received." and closes, much as ClickHouse would.
H11_MAX_INCOMPLETE_EVENT_SIZE = HTTP_MAX_URI_SIZE + (1 << 20)


class ClickHouseError(Exception):
    """An error reported the way ClickHouse does: `Code: N. DB::Exception: ...`."""

    def __init__(self, code: int, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or HTTP_STATUS_BY_CODE.get(code, 500)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ClickHouseError:
        if isinstance(exc, ClickHouseError):
            return exc
        text = str(exc)
        match = _CODE_RE.search(text)
        if match:  # chdb wraps the engine's text in prefixes like "Streaming query failed: "
            message = text[match.start() :]
            while nested := _NESTED_RE.match(message):  # and sometimes in itself, repeatedly
                message = nested.group(1)
            return cls(int(match.group(1)), message)
        return cls(1001, f"Code: 1001. DB::Exception: {text}. (STD_EXCEPTION)")

    @classmethod
    def bad_request(cls, text: str, code: int = 36, name: str = "BAD_ARGUMENTS") -> ClickHouseError:
        return cls(code, f"Code: {code}. DB::Exception: {text}. ({name})", status=400)

    @classmethod
    def form_limit(cls, problem: str) -> ClickHouseError:
        """A URL parameter or form field over a limit (see HTTP_MAX_URI_SIZE): code 1000, 500."""
        text = f"Poco::Exception. Code: 1000, e.code() = 0, HTML Form Exception: {problem}"
        return cls(1000, text)

    def response(self, query_id: str = "") -> Response:
        return PlainTextResponse(
            self.message.rstrip("\n") + "\n",
            status_code=self.status,
            headers={
                "X-ClickHouse-Exception-Code": str(self.code),
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Format": "TabSeparated",
            },
        )


@dataclass
class SessionState:
    """What a client's HTTP session (session_id) changed with SET / USE."""

    settings: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Applied:
    """Request-scoped changes made to the shared chdb session, to undo afterwards."""

    settings: set[str]
    database_changed: bool


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ClickHouseError.bad_request(f"Invalid setting name '{name}'", 115, "UNKNOWN_SETTING")
    return name


class Engine:
    """The one chdb session plus the bookkeeping that makes it look like a server.

    Every method except `close` must be called from a worker thread while holding `lock`.
    """

    SESSION_TTL_S = 3600.0

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._session = chdb_session.Session(str(data_dir))
        self.lock = anyio.Lock()
        self._sessions: dict[str, SessionState] = {}
        self._baseline = dict(self._rows("SELECT name, value FROM system.settings WHERE changed"))
        self.baseline_database = self._baseline.get("database", "default")
        self.timezone, self.version = self._rows("SELECT timezone(), version()")[0]

    def _rows(self, sql: str) -> list[list[str]]:
        text = bytes(self._session.query(sql, "TabSeparatedRaw").bytes()).decode()
        return [line.split("\t") for line in text.splitlines()]

    def _run(self, sql: str) -> None:
        self._session.query(sql, "TabSeparated")

    def session_state(self, session_id: str | None) -> SessionState | None:
        if not session_id:
            return None
        now = time.monotonic()
        expired = [k for k, v in self._sessions.items() if now - v.last_used > self.SESSION_TTL_S]
        for sid in expired:
            del self._sessions[sid]
        state = self._sessions.setdefault(session_id, SessionState())
        state.last_used = now
        return state

    def enter(self, settings: dict[str, str], database: str | None) -> Applied:
        applied = Applied(set(), False)
        try:
            if settings:
                assignments = ", ".join(f"{_ident(k)} = {_quote(v)}" for k, v in settings.items())
                applied.settings.update(settings)
                self._run(f"SET {assignments}")
            if database and database != self.baseline_database:
                applied.database_changed = True
                self._run(f"USE {_backquote(database)}")
        except BaseException:
            self.leave(applied)
            raise
        return applied

    def leave(self, applied: Applied) -> None:
        if applied.settings:
            restore = ", ".join(
                f"{name} = {_quote(self._baseline[name])}"
                if name in self._baseline
                else f"{name} = DEFAULT"
                for name in sorted(applied.settings)
            )
            self._run(f"SET {restore}")
        if applied.database_changed:
            self._run(f"USE {_backquote(self.baseline_database)}")

    def changed_settings(self) -> dict[str, str]:
        return dict(self._rows("SELECT name, value FROM system.settings WHERE changed"))

    def current_database(self) -> str:
        return self._rows("SELECT currentDatabase()")[0][0]

    def execute(self, sql: str, fmt: str, params: dict[str, str]) -> Any:
        """Start a statement: a StreamingResult for SELECT-like queries, else a full result."""
        try:
            return self._session.send_query(sql, fmt, params=params)
        except RuntimeError as exc:
            if _STREAMING_UNSUPPORTED not in str(exc):
                raise
        return self._session.query(sql, fmt, params=params)

    def query_whole(self, sql: str, fmt: str, params: dict[str, str]) -> Any:
        return self._session.query(sql, fmt, params=params)

    def begin_insert(self, statement: str, fmt: str) -> Any:
        return self._session.send_insert(statement, fmt)

    def close(self) -> None:
        self._session.close()


def _backquote(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


@dataclass
class Summary:
    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    result_rows: int = 0
    result_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add_result(self, result: Any) -> None:
        self.read_rows += result.rows_read()
        self.read_bytes += result.bytes_read()
        self.result_rows += result.rows_read()
        self.result_bytes += result.size()
        self.written_rows += result.rows_written()
        self.written_bytes += result.bytes_written()

    def header(self) -> str:
        elapsed_ns = int((time.perf_counter() - self.started) * 1e9)
        values = {
            "read_rows": self.read_rows,
            "read_bytes": self.read_bytes,
            "written_rows": self.written_rows,
            "written_bytes": self.written_bytes,
            "total_rows_to_read": self.read_rows,
            "result_rows": self.result_rows,
            "result_bytes": self.result_bytes,
            "elapsed_ns": elapsed_ns,
        }
        return json.dumps({k: str(v) for k, v in values.items()}, separators=(",", ":"))


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8123
    user: str = "default"
    password: str = ""
    display_name: str = "chdb-http"


@dataclass
class QueryRequest:
    """One parsed HTTP request: its SQL (or INSERT head), parameters and settings."""

    query_id: str
    sql: str
    params: dict[str, str]
    settings: dict[str, str]
    database: str | None
    default_format: str
    session_id: str | None
    response_encoding: str | None
    body: AsyncIterator[bytes] | None  # remaining (decoded) body: INSERT data


def _authenticate(request: Request, url: dict[str, str], config: ServerConfig) -> None:
    user, password = config.user, ""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ClickHouseError.bad_request("Malformed HTTP Basic authorization header") from exc
    if "x-clickhouse-user" in request.headers:
        user = request.headers["x-clickhouse-user"]
    if "x-clickhouse-key" in request.headers:
        password = request.headers["x-clickhouse-key"]
    user = url.get("user", user) or "default"
    password = url.get("password", password)
    if user != config.user or not secrets.compare_digest(password, config.password):
        raise ClickHouseError(
            516,
            f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, "
            "or there is no user with such name. (AUTHENTICATION_FAILED)",
        )


async def _decoded_body(request: Request, decoder: Decoder) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            if chunk:
                out = decoder.decompress(chunk)
                if out:
                    yield out
        decoder.finish()
    except ClientDisconnect:
        raise
    except (OSError, ValueError, RuntimeError, zlib.error) as exc:  # codecs raise assorted types
        raise ClickHouseError(
            354,
            f"Code: 354. DB::Exception: Cannot decompress request body: {exc}. (CANNOT_DECOMPRESS)",
        ) from exc


async def _prepend(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


def _check_form_limits(fields: Iterable[tuple[bytes | str, bytes]]) -> None:
    """ClickHouse's limits on URL parameters or multipart form fields, as sent."""
    for count, (name, value) in enumerate(fields, 1):
        if count > HTTP_MAX_FIELDS:
            raise ClickHouseError.form_limit("Too many form fields")
        if len(name) > HTTP_MAX_FIELD_NAME_SIZE:
            raise ClickHouseError.form_limit("Field name too long")
        if len(value) > HTTP_MAX_FIELD_VALUE_SIZE:
            raise ClickHouseError.form_limit("Field value too long")


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Fields of a multipart/form-data POST (clickhouse-connect sends server-side binds so)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise ClickHouseError.bad_request("Malformed multipart/form-data body")
    parts = list(message.iter_parts())
    if any(part.get_filename() for part in parts):
        raise ClickHouseError.bad_request(
            "External data (file parts in multipart/form-data) is not supported by this server"
        )
    fields = [
        (
            str(part.get_param("name", header="content-disposition") or ""),
            part.get_payload(decode=True),
        )
        for part in parts
    ]
    _check_form_limits(fields)
    return {name: value.decode() for name, value in fields if name}


async def parse_request(request: Request, config: ServerConfig) -> QueryRequest:
    raw_query: bytes = request.scope["query_string"]
    if raw_query:  # checked as sent, before authentication, like ClickHouse's HTMLForm
        fields = (field.partition(b"=") for field in raw_query.split(b"&"))
        _check_form_limits((name, value) for name, _, value in fields)
    url = dict(parse_qsl(request.url.query, keep_blank_values=True))
    _authenticate(request, url, config)
    content_type = request.headers.get("content-type", "")
    body: AsyncIterator[bytes] | None = None
    sql = url.get("query", "")
    if request.method == "POST":
        decoded = _decoded_body(request, request_decoder(request.headers.get("content-encoding")))
        # Like ClickHouse, only multipart bodies are forms; curl's default urlencoded type is
        # not, its body is the query (or INSERT data) as is.
        if content_type.startswith("multipart/form-data"):
            raw = b"".join([chunk async for chunk in decoded])
            form = _form_fields(content_type, raw)
            url.update(form)
            sql = url.get("query", "")
        elif sql and _INSERT_RE.match(sql):
            body = decoded  # INSERT statement in the URL: the body is its data
        elif sql:  # ClickHouse appends the body to the query parameter
            sql = sql + "\n" + (await _read_all(decoded)).decode()
        else:
            sql, body = await _read_statement_head(decoded)
    if not sql.strip():
        raise ClickHouseError.bad_request("Empty query", 62, "SYNTAX_ERROR")
    settings: dict[str, str] = {}
    params: dict[str, str] = {}
    for key, value in url.items():
        if key.startswith("param_"):
            params[key[6:]] = value
        elif key not in HANDLER_PARAMS:
            settings[key] = value
    encoding = None
    if url.get("enable_http_compression") in ("1", "true"):
        encoding = choose_response_encoding(request.headers.get("accept-encoding"))
    return QueryRequest(
        query_id=url.get("query_id") or str(uuid.uuid4()),
        sql=sql,
        params=params,
        settings=settings,
        database=url.get("database") or request.headers.get("x-clickhouse-database") or None,
        default_format=url.get("default_format")
        or request.headers.get("x-clickhouse-format")
        or "TabSeparated",
        session_id=url.get("session_id") or None,
        response_encoding=encoding,
        body=body,
    )


def _too_large() -> ClickHouseError:
    return ClickHouseError.bad_request(f"Query in the request body exceeds {MAX_QUERY_BYTES} bytes")


async def _read_all(body: AsyncIterator[bytes]) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in body:
        parts.append(chunk)
        size += len(chunk)
        if size > MAX_QUERY_BYTES:
            raise _too_large()
    return b"".join(parts)


async def _read_statement_head(
    body: AsyncIterator[bytes],
) -> tuple[str, AsyncIterator[bytes] | None]:
    """Split a POST body into its SQL and, for an INSERT with data, the stream of that data.

    A query is read whole (queries are small). An INSERT is read only up to its `FORMAT Name`
    line (or `VALUES`), so the data behind it streams into the engine unbuffered.
    """
    buffer = b""
    async for chunk in body:
        buffer += chunk
        if not _INSERT_RE_B.match(buffer):
            if len(buffer) > MAX_QUERY_BYTES:
                raise _too_large()
            continue
        match = _INSERT_DATA_RE_B.match(buffer)
        # Wait for a byte past the match, so "FORMAT JSONEach|Row" or a split "\r\n" is complete.
        if match and match.end() < len(buffer):
            return buffer[: match.end()].decode(), _prepend(buffer[match.end() :], body)
        if len(buffer) > MAX_STATEMENT_BYTES:
            raise ClickHouseError.bad_request(
                "INSERT at the head of the request body has no 'FORMAT <name>' within 1 MiB"
            )
    return buffer.decode("utf-8", errors="replace"), None


class _Sink:
    """A write-only file for pyarrow writers that hands out what was written so far."""

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._pos += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class ArrowReframer:
    """chdb renders each streamed block as a complete Arrow file/stream; merge them into one."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._sink = _Sink()
        self._writer: Any = None

    def feed(self, chunk: bytes) -> bytes:
        reader: Any
        reader = pa.ipc.open_file(chunk) if self._kind == "file" else pa.ipc.open_stream(chunk)
        if self._writer is None:
            opener = pa.ipc.new_file if self._kind == "file" else pa.ipc.new_stream
            self._writer = opener(pa.PythonFile(self._sink, mode="w"), reader.schema)
        if self._kind == "file":
            for i in range(reader.num_record_batches):
                self._writer.write_batch(reader.get_batch(i))
        else:
            for batch in reader:
                self._writer.write_batch(batch)
        return self._sink.take()

    def finish(self) -> bytes:
        if self._writer is not None:
            self._writer.close()
        return self._sink.take()


def _output_format(sql: str, default_format: str) -> str:
    match = _FORMAT_RE.search(sql)
    return match.group(1) if match else default_format


def _exception_block(tag: str, message: str) -> bytes:
    """ClickHouse's in-band error marker for an error after the response has started."""
    text = message.rstrip("\n").encode()
    return (
        b"\r\n__exception__\r\n"
        + tag.encode()
        + b"\r\n"
        + text
        + b"\r\n"
        + f"{len(text)} ".encode()
        + tag.encode()
        + b"\r\n__exception__\r\n"
    )


class QueryResponse(Response):
    """Runs one request on the engine and streams the result; owns the engine lock throughout.

    Headers go out only after the first result chunk, so errors raised while planning or
    starting the query become a proper HTTP error response.
    """

    def __init__(self, engine: Engine, config: ServerConfig, req: QueryRequest) -> None:
        self.engine = engine
        self.config = config
        self.req = req
        self.background = None
        self._started = False
        self._tag = secrets.token_hex(8)
        self._encoder: Any = None

    def _headers(self, fmt: str, summary: Summary) -> list[tuple[bytes, bytes]]:
        tz = self.req.settings.get("session_timezone") or self.engine.timezone
        headers = {
            "content-type": "text/plain; charset=UTF-8"
            if fmt.lower().startswith(("tabseparated", "tsv", "csv", "json", "pretty", "values"))
            else "application/octet-stream",
            "x-clickhouse-format": fmt,
            "x-clickhouse-timezone": tz,
            "x-clickhouse-query-id": self.req.query_id,
            "x-clickhouse-server-display-name": self.config.display_name,
            "x-clickhouse-summary": summary.header(),
            "x-clickhouse-exception-tag": self._tag,
        }
        if self.req.session_id:
            headers["x-clickhouse-session-id"] = self.req.session_id
        if self.req.response_encoding:
            headers["content-encoding"] = self.req.response_encoding
        return [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.engine.lock:
                await self._run(receive, send)
        except ClientDisconnect:
            log.info("query %s: client went away while sending its body", self.req.query_id)
        except ClickHouseError as exc:
            log.warning("query %s failed: %s", self.req.query_id, exc.message.splitlines()[0])
            if not self._started:
                await exc.response(self.req.query_id)(scope, receive, send)

    async def _run(self, receive: Receive, send: Send) -> None:
        req, engine = self.req, self.engine
        summary = Summary()
        state = engine.session_state(req.session_id)
        settings = dict(state.settings) if state else {}
        settings.update(req.settings)
        database = req.database or (state.database if state else None)
        applied = await _in_thread(engine.enter, settings, database)
        stream = None
        try:
            sql = req.sql
            if req.body is not None:
                match = _INSERT_DATA_RE.match(sql)
                if match:
                    await self._insert(match, send, summary)
                    return
                sql = sql + "\n" + (await _read_all(req.body)).decode()
            fmt = _output_format(sql, req.default_format)
            changes_session = bool(_SET_RE.match(sql) or _USE_RE.match(sql))
            before = await _in_thread(engine.changed_settings) if changes_session else {}
            if fmt.lower() in STREAMABLE_FORMATS or fmt.lower() in ARROW_FORMATS:
                result = await _in_thread(engine.execute, sql, req.default_format, req.params)
            else:
                result = await _in_thread(engine.query_whole, sql, req.default_format, req.params)
            if changes_session:
                await _in_thread(self._remember, sql, state, before, applied)
            if hasattr(result, "fetch"):
                stream = result
                await self._stream(stream, sql, fmt, summary, receive, send)
            else:
                summary.add_result(result)
                body = bytes(result.bytes())
                await self._start(send, fmt, summary)
                await self._send_body(send, body, last=True)
        finally:
            with anyio.CancelScope(shield=True):
                if stream is not None:
                    await run_sync(_quiet(stream.cancel))
                await run_sync(engine.leave, applied)

    def _remember(
        self, sql: str, state: SessionState | None, before: dict[str, str], applied: Applied
    ) -> None:
        """Record what a SET/USE changed: kept for the HTTP session, undone on the engine."""
        for name, value in self.engine.changed_settings().items():
            if name != "database" and before.get(name) != value:
                applied.settings.add(name)
                if state is not None:
                    state.settings[name] = value
        if _USE_RE.match(sql):
            applied.database_changed = True
            if state is not None:
                state.database = self.engine.current_database()

    async def _insert(self, match: re.Match[str], send: Send, summary: Summary) -> None:
        req = self.req
        fmt = "Values" if match.group("values") else match.group("fmt")
        statement = match.group("stmt")
        tail = req.sql[match.end() :]
        inserter = await _in_thread(self.engine.begin_insert, statement, fmt)
        try:
            if tail.strip():
                await _in_thread(inserter.append, tail.encode())
            assert req.body is not None
            async for chunk in req.body:
                await _in_thread(inserter.append, chunk)
            result = await _in_thread(inserter.finish)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await run_sync(_quiet(inserter.cancel))
            raise
        summary.written_rows = result.rows_written
        summary.written_bytes = result.bytes_written
        await self._start(send, req.default_format, summary)
        await self._send_body(send, b"", last=True)

    async def _stream(
        self, stream: Any, sql: str, fmt: str, summary: Summary, receive: Receive, send: Send
    ) -> None:
        kind = ARROW_FORMATS.get(fmt.lower())
        reframer = ArrowReframer(kind) if kind else None
        first = await _in_thread(stream.fetch)
        if first is not None:
            summary.add_result(first)
        elif reframer is not None:
            # No rows: a streamed Arrow result has no chunk to take the schema from, so render
            # the (empty, cheap) result in one piece to send a valid schema-only file.
            first = await _in_thread(
                self.engine.query_whole, sql, self.req.default_format, self.req.params
            )
            reframer = None
        await self._start(send, fmt, summary)
        async with anyio.create_task_group() as tg:
            # A client that goes away must release the engine: cancel the fetch loop.
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            chunk = first
            try:
                while chunk is not None:
                    data = bytes(chunk.bytes())
                    if reframer is not None:
                        data = await _in_thread(reframer.feed, data)
                    await self._send_body(send, data)
                    chunk = await _in_thread(stream.fetch)
                tail = await _in_thread(reframer.finish) if reframer else b""
                await self._send_body(send, tail, last=True)
            except ClickHouseError as exc:
                log.warning("query %s failed mid-stream: %s", self.req.query_id, exc.message)
                await self._send_body(send, _exception_block(self._tag, exc.message), last=True)
            tg.cancel_scope.cancel()

    async def _start(self, send: Send, fmt: str, summary: Summary) -> None:
        encoding = self.req.response_encoding
        self._encoder = response_encoder(encoding) if encoding else None
        await send(
            {"type": "http.response.start", "status": 200, "headers": self._headers(fmt, summary)}
        )
        self._started = True

    async def _send_body(self, send: Send, data: bytes, last: bool = False) -> None:
        if self._encoder is not None:
            data = self._encoder.compress(data) if data else b""
            if last:
                data += self._encoder.flush()
        if data or last:
            await send({"type": "http.response.body", "body": data, "more_body": not last})


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def _quiet(fn: Callable[[], Any]) -> Callable[[], None]:
    def call() -> None:
        try:
            fn()
        except Exception as exc:  # cleanup must not mask the original outcome
            log.debug("cleanup call failed: %s", exc)

    return call


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an engine call in a worker thread, turning engine errors into ClickHouseError."""
    try:
        return await run_sync(fn, *args)
    except ClickHouseError:
        raise
    except (RuntimeError, ValueError, TypeError, pa.ArrowException) as exc:
        raise ClickHouseError.from_exception(exc) from exc


class RequestHeadLimits:
    """ClickHouse's limits on the request line and headers (see HTTP_MAX_URI_SIZE)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = _head_problem(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        log.info("refused a request: %s", problem)  # ClickHouse, too, only logs the reason
        headers = [(b"content-length", b"0"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _head_problem(scope: Scope) -> str | None:
    query: bytes = scope["query_string"]
    uri_size = len(scope["raw_path"]) + (1 + len(query) if query else 0)
    if uri_size > HTTP_MAX_URI_SIZE:
        return "HTTP request URI invalid or too long"
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    if len(headers) > HTTP_MAX_FIELDS:
        return "Too many header fields"
    for name, value in headers:
        if len(name) > HTTP_MAX_FIELD_NAME_SIZE:
            return "Field name is too long"
        if len(value) > HTTP_MAX_FIELD_VALUE_SIZE:
            return "Field value is too long"
    return None


def build_app(config: ServerConfig, engine: Engine) -> Starlette:
    async def ping(request: Request) -> Response:
        return PlainTextResponse("Ok.\n")

    async def replicas_status(request: Request) -> Response:
        return PlainTextResponse("Ok.\n")

    async def query(request: Request) -> Response:
        query_id = request.query_params.get("query_id", "")
        try:
            req = await parse_request(request, config)
        except ClickHouseError as exc:
            return exc.response(query_id)
        except UnsupportedEncodingError as exc:
            return ClickHouseError.bad_request(str(exc)).response(query_id)
        except ClientDisconnect:
            return Response(status_code=400)
        return QueryResponse(engine, config, req)

    return Starlette(
        routes=[
            Route("/ping", ping, methods=["GET", "HEAD"]),
            Route("/replicas_status", replicas_status, methods=["GET"]),
            Route("/", query, methods=["GET", "POST"]),
        ],
        middleware=[Middleware(RequestHeadLimits)],
    )


def serve(
    data_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8123,
    user: str = "default",
    password: str = "",
) -> None:
    """Open the data dir, serve until SIGTERM/SIGINT, then close the engine (flushes data)."""
    config = ServerConfig(Path(data_dir), host, port, user or "default", password)
    engine = Engine(config.data_dir)
    app = build_app(config, engine)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,  # keep this process's logging setup (stderr)
            access_log=False,
            lifespan="off",
            http="h11",  # the limit below is h11's; httptools, if installed, has its own
            h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_SIZE,
        )
    )

    async def announce() -> None:
        while not server.started:
            await anyio.sleep(0.05)
        print(f"clickhouse-http ready on http://{host}:{port}", file=sys.stderr, flush=True)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(announce)
            await server.serve()
            tg.cancel_scope.cancel()

    def stop(signum: int, frame: object) -> None:
        # uvicorn swaps in its own handler while serving and re-raises the signal once it has
        # stopped; landing here then lets us close the engine and exit 0 instead of dying.
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        anyio.run(main)
    finally:
        engine.close()
        log.info("chdb session closed")
    if not server.started:
        raise SystemExit(f"clickhouse-http could not listen on {host}:{port} (is the port taken?)")


def spawn(
    data_dir: str | Path,
    port: int,
    host: str = "127.0.0.1",
    password: str | None = None,
    log_file: IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start this server as a child process (stop it with SIGTERM so data is flushed)."""
    cmd = [sys.executable, "-m", "devstack.clickhouse_http", "--data-dir", str(data_dir)]
    cmd += ["--host", host, "--port", str(port)]
    if password is not None:
        cmd += ["--password", password]
    return subprocess.Popen(cmd, stdout=log_file, stderr=log_file)


def wait_ready(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float = 60.0) -> None:
    """Wait until `/ping` answers; fail early, naming the cause, if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"clickhouse-http exited with code {proc.returncode} before answering on "
                f"{host}:{port}; see its log (port taken? data dir locked by another process?)"
            )
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/ping", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"clickhouse-http did not answer on {host}:{port} within {timeout}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.clickhouse_http",
        description="Serve ClickHouse's HTTP interface over one embedded chdb session.",
    )
    parser.add_argument("--data-dir", required=True, help="chdb data dir (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8123, help="port to bind (default 8123)")
    parser.add_argument("--user", default="default", help="accepted user name (default 'default')")
    parser.add_argument(
        "--password",
        default=None,
        help="required password (default: env CLICKHOUSE_PASSWORD, else none)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    password = args.password
    if password is None:
        password = os.environ.get("CLICKHOUSE_PASSWORD", "")
    serve(args.data_dir, args.host, args.port, args.user, password)


if __name__ == "__main__":
    main()
