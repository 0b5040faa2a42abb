"""Reading a request the way ClickHouse's HTTP handler does (src/Server/HTTPHandler.cpp).

`parse_head` reads what comes before the body: URL parameters (settings, `param_*`, handler
parameters), headers and credentials. `read_query` then reads the body: the query is the
`query` parameter, a line break and the body (bytes, never decoded: a statement may hold any
bytes); an INSERT's data is left to stream into the engine; a multipart/form-data body carries
form fields and external data (file parts that become temporary tables for the query).
"""

from __future__ import annotations

import base64
import binascii
import secrets
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import unquote_to_bytes

from starlette.requests import ClientDisconnect, Request

from devstack.clickhouse_http import statements
from devstack.clickhouse_http.codecs import (
    Decoder,
    UnsupportedEncodingError,
    choose_response_encoding,
    request_decoder,
)
from devstack.clickhouse_http.config import ServerConfig
from devstack.clickhouse_http.errors import (
    AUTHENTICATION_FAILED,
    CANNOT_DECOMPRESS,
    NOT_IMPLEMENTED,
    SYNTAX_ERROR,
    ClickHouseError,
)
from devstack.clickhouse_http.limits import check_form_limits, check_url_limits
from devstack.clickhouse_http.sessions import parse_session_timeout

# URL parameters the HTTP handler consumes itself; every other one (but `param_*`) is a setting.
HANDLER_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
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
        # Real settings that only steer the HTTP layer, which the front handles (or ignores).
        "enable_http_compression",
        "http_zlib_compression_level",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "http_wait_end_of_query",
        "http_response_buffer_size",
        "cancel_http_readonly_queries_on_client_close",
        "add_http_cors_header",
        "http_native_compression_disable_checksumming_on_decompress",
        # readonly=1 would forbid restoring the other settings afterwards; not emulated.
        "readonly",
    }
)
# With external data, `<table>_structure`, `<table>_types` and `<table>_format` describe the
# tables, and are neither settings nor handler parameters.
EXTERNAL_TABLE_SUFFIXES = ("_structure", "_types", "_format")
# A query sent in a body (not INSERT data) is read whole; refuse absurd sizes.
MAX_QUERY_BYTES = 64 << 20
# An INSERT statement at the head of a POST body is at most this long before its data starts.
MAX_STATEMENT_BYTES = 1 << 20
# External data is read whole before the query runs (ClickHouse's default limit is 1 GiB).
MAX_MULTIPART_BYTES = 256 << 20


@dataclass
class ExternalTable:
    """A file part of a multipart request: a temporary table that exists for the query only."""

    name: str
    columns: str  # column definitions, "a UInt32, b String"
    format: str
    data: bytes


@dataclass
class QueryRequest:
    """One request: what the URL and headers say, then (after `read_query`) its statement."""

    method: str
    url: dict[str, bytes]
    query_id: str
    settings: dict[str, str]
    params: dict[str, str]
    database: str | None
    default_format: str
    session_id: str | None
    session_timeout: int
    session_check: bool
    close_session: bool
    client_protocol_version: int
    response_encoding: str | None
    multipart: bool
    content_type: str
    content_encoding: str | None
    sql: bytes = b""
    data: AsyncIterator[bytes] | None = None  # INSERT data still to come, decoded
    external_tables: list[ExternalTable] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The statement as text, for the front's own look at it (the engine gets the bytes)."""
        return self.sql.decode("utf-8", errors="replace")


def parse_url(raw_query: bytes) -> dict[str, bytes]:
    """URL parameters as bytes (values may be any bytes once percent-decoded); last one wins."""
    url: dict[str, bytes] = {}
    for field_ in raw_query.split(b"&"):
        if not field_:
            continue
        name, _, value = field_.partition(b"=")
        key = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", errors="replace")
        url[key] = unquote_to_bytes(value.replace(b"+", b" "))
    return url


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def parse_head(request: Request, config: ServerConfig) -> QueryRequest:
    """Everything but the body: raises ClickHouseError for a request ClickHouse would refuse."""
    raw_query: bytes = request.scope["query_string"]
    check_url_limits(raw_query)  # as sent, before authentication, like ClickHouse's HTMLForm
    url = parse_url(raw_query)
    _authenticate(request, url, config)
    content_type = request.headers.get("content-type", "")
    multipart = content_type.startswith("multipart/form-data")
    settings: dict[str, str] = {}
    params: dict[str, str] = {}
    for key, value in url.items():
        if key.startswith("param_"):
            params[key[6:]] = _text(value)
        elif key and key not in HANDLER_PARAMS and not (multipart and _describes_table(key)):
            settings[key] = _text(value)
    for name in ("compress", "decompress"):
        if _flag(url.get(name)):  # silently ignored, it would hand out or read garbage
            raise ClickHouseError.of(
                NOT_IMPLEMENTED,
                "NOT_IMPLEMENTED",
                f"{name}=1 (ClickHouse's own block compression) is not supported by the embedded "
                "server; use Content-Encoding / Accept-Encoding with enable_http_compression=1",
            )
    session_id = _text(url.get("session_id", b"")) or None
    timeout = _text(url["session_timeout"]) if "session_timeout" in url else None
    encoding = None
    if _flag(url.get("enable_http_compression")):
        encoding = choose_response_encoding(request.headers.get("accept-encoding"))
    query_id = _text(url.get("query_id", b"")) or request.headers.get("x-clickhouse-query-id", "")
    return QueryRequest(
        method=request.method,
        url=url,
        query_id=query_id or str(uuid.uuid4()),
        settings=settings,
        params=params,
        database=request.headers.get("x-clickhouse-database")
        or _text(url.get("database", b""))
        or None,
        default_format=request.headers.get("x-clickhouse-format")
        or _text(url.get("default_format", b""))
        or "TabSeparated",
        session_id=session_id,
        session_timeout=parse_session_timeout(timeout) if session_id else 0,
        session_check=_flag(url.get("session_check")),
        close_session=_flag(url.get("close_session")),
        client_protocol_version=_protocol_version(url.get("client_protocol_version")),
        response_encoding=encoding,
        multipart=multipart,
        content_type=content_type,
        content_encoding=request.headers.get("content-encoding"),
    )


def _describes_table(key: str) -> bool:
    return key.endswith(EXTERNAL_TABLE_SUFFIXES)


def _flag(value: bytes | None) -> bool:
    return value is not None and value.strip().lower() in (b"1", b"true")


def _protocol_version(value: bytes | None) -> int:
    if value is None:
        return 0
    if not value.isdigit():
        raise ClickHouseError.of(
            6, "CANNOT_PARSE_TEXT", f"Cannot parse client_protocol_version '{_text(value)}'"
        )
    return int(value)


def _authenticate(request: Request, url: dict[str, bytes], config: ServerConfig) -> None:
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
    user = _text(url.get("user", user.encode())) or "default"
    password = _text(url.get("password", password.encode()))
    if user != config.user or not secrets.compare_digest(password, config.password):
        raise ClickHouseError.of(
            AUTHENTICATION_FAILED,
            "AUTHENTICATION_FAILED",
            f"{user}: Authentication failed: password is incorrect, or there is no user with "
            "such name",
        )


async def read_query(request: Request, req: QueryRequest) -> None:
    """Read the statement from the URL and body into `req` (INSERT data is left to stream)."""
    sql = req.url.get("query", b"")
    if request.method == "POST":
        try:
            decoder = request_decoder(req.content_encoding)
        except UnsupportedEncodingError as exc:
            raise ClickHouseError.bad_request(str(exc)) from exc
        body = _decoded_body(request, decoder)
        # Like ClickHouse, only multipart bodies are forms; curl's default urlencoded type is
        # not: its body is the query (or INSERT data) as is.
        if req.multipart:
            raw = await _read_all(body, MAX_MULTIPART_BYTES, "multipart/form-data body")
            sql += _read_form(req, raw)
        elif sql and statements.INSERT_RE_B.match(sql):
            sql += b"\n"
            req.data = body  # INSERT statement in the URL: the body is its data
        elif sql:  # the body continues the query parameter
            sql += b"\n" + await _read_all(body, MAX_QUERY_BYTES, "query in the request body")
        else:
            sql, req.data = await _read_statement_head(body)
    if not sql.strip():
        raise ClickHouseError.of(SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
    req.sql = sql


def _read_form(req: QueryRequest, body: bytes) -> bytes:
    """Fields and file parts of a multipart/form-data body; returns its `query` field."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + req.content_type.encode() + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise ClickHouseError.bad_request("Malformed multipart/form-data body")
    sql = b""
    fields: list[tuple[str, bytes]] = []
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition") or "")
        payload = part.get_payload(decode=True)  # a leaf part: its bytes, or None
        value = payload if isinstance(payload, bytes) else b""
        if part.get_filename() is not None:
            req.external_tables.append(_external_table(req, name or "_data", value))
            continue
        fields.append((name, value))
    check_form_limits(fields)
    for name, value in fields:
        # As in ClickHouse, a form field is the query or a query parameter; nothing else.
        if name == "query":
            sql += value
        elif name.startswith("param_"):
            req.params[name[6:]] = _text(value)
    return sql


def _external_table(req: QueryRequest, name: str, data: bytes) -> ExternalTable:
    """A file part as ClickHouse reads it (src/Core/ExternalTable.cpp, ExternalTablesHandler)."""
    fmt = _text(req.url.get(f"{name}_format", b"TabSeparated"))
    if f"{name}_structure" in req.url:
        columns = _text(req.url[f"{name}_structure"])
    elif f"{name}_types" in req.url:
        types = statements.split_top_level(_text(req.url[f"{name}_types"]))
        columns = ", ".join(f"_{i} {type_}" for i, type_ in enumerate(types, 1))
    else:
        raise ClickHouseError.bad_request(
            f"Neither structure nor types have not been provided for external table {name}. "
            f"Use fields {name}_structure or {name}_types to do so"
        )
    return ExternalTable(name, columns, fmt, data)


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
        raise ClickHouseError.of(
            CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", f"Cannot decompress request body: {exc}"
        ) from exc


async def _prepend(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


async def _read_all(body: AsyncIterator[bytes], limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in body:
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ClickHouseError.bad_request(f"The {what} exceeds {limit} bytes")
    return b"".join(parts)


async def _read_statement_head(
    body: AsyncIterator[bytes],
) -> tuple[bytes, AsyncIterator[bytes] | None]:
    """Split a POST body into its statement and, for an INSERT with data, the stream of that data.

    A query is read whole (queries are small). An INSERT is read only up to its `FORMAT Name`
    line (or `VALUES`), so the data behind it streams into the engine unbuffered.
    """
    buffer = b""
    async for chunk in body:
        buffer += chunk
        if not statements.INSERT_RE_B.match(buffer):
            if len(buffer) > MAX_QUERY_BYTES:
                raise ClickHouseError.bad_request(
                    f"The query in the request body exceeds {MAX_QUERY_BYTES} bytes"
                )
            continue
        match = statements.INSERT_DATA_RE_B.match(buffer)
        # Wait for a byte past the match, so "FORMAT JSONEach|Row" or a split "\r\n" is complete.
        if match and match.end() < len(buffer):
            return buffer[: match.end()], _prepend(buffer[match.end() :], body)
        if len(buffer) > MAX_STATEMENT_BYTES:
            raise ClickHouseError.bad_request(
                "INSERT at the head of the request body has no 'FORMAT <name>' within 1 MiB"
            )
    return buffer, None
