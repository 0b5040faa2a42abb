"""One request to `/`: read it, take its session, run its statement, stream the answer.

The steps, in ClickHouse's order (src/Server/HTTPHandler.cpp): authenticate and read the URL;
take the session (or refuse with SESSION_IS_LOCKED at once); read the query from the body; wait
for an engine slot (admission.py); apply the URL's settings and database for this request;
create the external-data tables; run the statement; undo what the request changed for itself
(a SET or USE statement's changes stay with the session); give the session back.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pyarrow as pa
from anyio.to_thread import run_sync
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from devstack.clickhouse_http import statements
from devstack.clickhouse_http.admission import Admission
from devstack.clickhouse_http.codecs import Encoder, response_encoder
from devstack.clickhouse_http.config import ServerConfig
from devstack.clickhouse_http.engine import Applied, Connection, Engine
from devstack.clickhouse_http.errors import ClickHouseError
from devstack.clickhouse_http.native import NativeUpgrade
from devstack.clickhouse_http.request import MAX_QUERY_BYTES, QueryRequest, parse_head, read_query
from devstack.clickhouse_http.response import (
    ARROW_FORMATS,
    STREAMABLE_FORMATS,
    TEXT_PLAIN,
    ArrowReframer,
    Summary,
    content_type,
    encode_headers,
    error_body,
    error_headers,
    exception_block,
)
from devstack.clickhouse_http.sessions import Lease, SessionRegistry

log = logging.getLogger("devstack.clickhouse_http")


class Reply:
    """The response of one request: headers once, then the body, compressed if asked."""

    def __init__(self, send: Send, display_name: str) -> None:
        self._send = send
        self.display_name = display_name
        self.started = False
        self.finished = False  # the last piece of the body is sent
        self.tag = secrets.token_hex(8)  # marks an error written into a started body
        self._encoder: Encoder | None = None
        # Runs just before the last piece of the response goes out: a client may send its next
        # request as soon as it has the whole answer, and must then find its session free.
        self.before_end: Callable[[], Awaitable[None]] | None = None

    async def end(self) -> None:
        if self.before_end is not None:
            hook, self.before_end = self.before_end, None
            await hook()

    async def start(self, headers: dict[str, str], encoding: str | None) -> None:
        if encoding:
            headers["Content-Encoding"] = encoding
            self._encoder = response_encoder(encoding)
        headers["X-ClickHouse-Exception-Tag"] = self.tag
        message = {"type": "http.response.start", "status": 200, "headers": encode_headers(headers)}
        await self._send(message)
        self.started = True

    async def body(self, data: bytes, last: bool = False) -> None:
        if self._encoder is not None:
            data = self._encoder.compress(data) if data else b""
            if last:
                data += self._encoder.flush()
        if last:
            await self.end()
            self.finished = True
        if data or last:
            await self._send({"type": "http.response.body", "body": data, "more_body": not last})

    async def fail(self, exc: ClickHouseError, query_id: str = "", timezone: str = "") -> None:
        """Answer with the error: as the whole response, or, once started, inside the body."""
        if self.started:
            await self.body(exception_block(self.tag, exc.message), last=True)
            return
        headers = error_headers(exc, self.display_name, query_id, timezone)
        message = {"type": "http.response.start", "status": exc.status}
        await self._send({**message, "headers": encode_headers(headers)})
        self.started = True
        await self.end()
        await self._send({"type": "http.response.body", "body": error_body(exc)})


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an engine call in a worker thread, turning engine errors into ClickHouseError."""
    try:
        return await run_sync(fn, *args)
    except ClickHouseError:
        raise
    except (RuntimeError, ValueError, TypeError, pa.ArrowException) as exc:
        raise ClickHouseError.from_exception(exc) from exc


def _quietly(fn: Callable[[], Any]) -> Callable[[], None]:
    def call() -> None:
        try:
            fn()
        except Exception as exc:  # cleanup must not mask the original outcome
            log.debug("cleanup call failed: %s", exc)

    return call


class QueryHandler:
    """The ASGI app behind `/`."""

    def __init__(
        self,
        engine: Engine,
        sessions: SessionRegistry,
        admission: Admission,
        config: ServerConfig,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.admission = admission
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        reply = Reply(send, self.config.display_name)
        try:
            req = parse_head(request, self.config)
        except ClickHouseError as exc:
            await reply.fail(exc)
            return
        try:
            lease = await in_thread(
                self.sessions.acquire,
                req.session_id,
                req.session_timeout,
                req.session_check,
                req.close_session,
            )
        except ClickHouseError as exc:
            # Refused before the query ran (as ClickHouse does, before it has a query id).
            log.info("query %s refused: %s", req.query_id, exc.message)
            await reply.fail(exc)
            return
        statement = Statement(self.engine, lease, req, reply, receive)

        async def finish() -> None:
            """Undo the request's changes and give the session back (once)."""
            with anyio.CancelScope(shield=True):
                await statement.cleanup()
                await run_sync(_quietly(lambda: self.sessions.release(lease)))

        reply.before_end = finish
        try:
            await self._run(request, req, statement, reply)
        except ClientDisconnect:
            log.info("query %s: the client went away", req.query_id)
        finally:
            await reply.end()

    async def _run(
        self, request: Request, req: QueryRequest, statement: Statement, reply: Reply
    ) -> None:
        try:
            await read_query(request, req)
        except ClickHouseError as exc:
            log.info("query %s refused: %s", req.query_id, exc.message)
            await reply.fail(exc)
            return
        try:
            async with self.admission.slot(req.query_id):
                await statement.run()
        except ClickHouseError as exc:
            log.warning("query %s failed: %s", req.query_id, exc.message.splitlines()[0])
            await reply.fail(exc, req.query_id, statement.timezone)


class Statement:
    """One request's statement on its connection (see the module docstring for the steps)."""

    def __init__(
        self, engine: Engine, lease: Lease, req: QueryRequest, reply: Reply, receive: Receive
    ) -> None:
        self.engine = engine
        self.conn: Connection = lease.connection
        self.keeps_state = lease.session is not None and not lease.close_session
        self.req = req
        self.reply = reply
        self.receive = receive
        self.summary = Summary()
        # X-ClickHouse-Timezone: the session_timezone in effect (URL, else the session's SET).
        self.timezone = (
            req.settings.get("session_timezone") or self.conn.session_timezone or engine.timezone
        )
        self._kept: set[str] = set()  # settings the statement itself SET: they stay
        self._used_database = False  # the statement was a USE: its database stays
        self._applied: Applied | None = None  # what the URL changed, to undo
        self._tables: list[str] = []  # external tables created for this query

    async def run(self) -> None:
        req = self.req
        self._applied = await in_thread(
            self.conn.apply, req.settings, req.database, self.keeps_state
        )
        for table in req.external_tables:
            self._tables.append(table.name)
            await in_thread(
                self.conn.create_external_table, table.name, table.columns, table.format, table.data
            )
        match = statements.INSERT_DATA_RE_B.match(req.sql)
        if match and req.data is not None:
            await self._insert(match)
        else:
            await self._statement()

    async def cleanup(self) -> None:
        """Drop the external tables and undo the URL's settings (a session keeps the rest)."""
        for name in self._tables:
            await run_sync(_quietly(functools.partial(self.conn.drop_temporary_table, name)))
        self._tables = []
        applied, self._applied = self._applied, None
        if applied is not None and self.keeps_state:
            await run_sync(
                _quietly(lambda: self.conn.restore(applied, self._kept, self._used_database))
            )

    # --- statements that answer -----------------------------------------------------------------
    async def _statement(self) -> None:
        req, text = self.req, self.req.text
        fmt = statements.output_format(text, req.default_format)
        changes_session = statements.is_set(text) or statements.is_use(text)
        before = await in_thread(self.conn.changed_settings) if changes_session else {}
        upgrade = self._native_upgrade(fmt)
        stream = None
        if fmt.lower() in STREAMABLE_FORMATS or fmt.lower() in ARROW_FORMATS:
            stream = await in_thread(self.conn.stream, req.sql, req.default_format, req.params)
        if stream is not None:
            await self._stream(stream, fmt, upgrade)
            return
        result = await self._run_whole(statements.returns_result(text))
        if changes_session:
            await in_thread(self._remember_session_change, text, before)
        self.summary.add_result(result)
        body = bytes(result.bytes())
        if upgrade is not None and self._wants_column_types(upgrade, body):
            upgrade.column_types = await self._column_types()
        await self._start(fmt if statements.returns_result(text) else None)
        await self.reply.body(upgrade.blocks(body) if upgrade else body, last=True)

    def _native_upgrade(self, fmt: str) -> NativeUpgrade | None:
        """For Native output to a client that names its protocol revision (native.py)."""
        revision = self.req.client_protocol_version
        if fmt.lower() != "native" or revision <= 0:
            return None
        return NativeUpgrade(revision)

    def _wants_column_types(self, upgrade: NativeUpgrade, first_block: bytes) -> bool:
        # Only a SELECT can be described.
        return statements.is_select(self.req.text) and upgrade.wants_column_types(first_block)

    async def _column_types(self) -> list[str] | None:
        sql = statements.without_format(self.req.text)
        return await in_thread(self.conn.result_types, sql, self.req.params)

    async def _run_whole(self, cancellable: bool) -> Any:
        """Run a statement to its end. A query that answers is cancelled if its client leaves
        (writing its answer would fail there too); others (DDL, INSERT ... SELECT) finish, as
        they do in ClickHouse."""
        req = self.req
        if not cancellable:
            return await in_thread(self.conn.query, req.sql, req.default_format, req.params)
        marker = f"/* chdb-http {secrets.token_hex(8)} */ "
        sql = marker.encode() + req.sql
        outcome: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._kill_on_disconnect, marker)
            try:
                outcome.append(
                    await in_thread(self.conn.query, sql, req.default_format, req.params)
                )
            except ClickHouseError as exc:  # raised outside the task group, not as a group
                outcome.append(exc)
            finally:
                tg.cancel_scope.cancel()
        if isinstance(outcome[0], ClickHouseError):
            raise outcome[0]
        return outcome[0]

    async def _kill_on_disconnect(self, marker: str) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                log.info("query %s: client went away, cancelling it", self.req.query_id)
                await in_thread(self.engine.kill, marker)
                return

    def _remember_session_change(self, text: str, before: dict[str, str]) -> None:
        """What a SET or USE statement changed stays with the session."""
        after = self.conn.changed_settings()
        self._kept = {n for n in after.keys() | before.keys() if after.get(n) != before.get(n)}
        self._used_database = statements.is_use(text)
        if "session_timezone" in self._kept:
            self.conn.session_timezone = after.get("session_timezone", "")
            self.timezone = self.conn.session_timezone or self.engine.timezone

    async def _stream(self, stream: Any, fmt: str, upgrade: NativeUpgrade | None) -> None:
        req = self.req
        kind = ARROW_FORMATS.get(fmt.lower())
        reframer = ArrowReframer(kind) if kind else None
        try:
            first = await in_thread(stream.fetch)
            if (
                first is not None
                and upgrade is not None
                and self._wants_column_types(upgrade, bytes(first.bytes()))
            ):
                # Nothing is sent yet: describe the statement, then run it again from the start
                # (the connection answers one statement at a time).
                await run_sync(_quietly(stream.cancel))
                upgrade.column_types = await self._column_types()
                stream = await in_thread(self.conn.stream, req.sql, req.default_format, req.params)
                first = await in_thread(stream.fetch)
            if first is not None:
                self.summary.add_result(first)
            elif reframer is not None:
                # No rows: a streamed Arrow result has no chunk to take the schema from, so
                # render the (empty, cheap) result in one piece to send a valid schema-only file.
                first = await in_thread(self.conn.query, req.sql, req.default_format, req.params)
                reframer = None
            await self._start(fmt)
            async with anyio.create_task_group() as tg:
                # A client that goes away must release the connection: stop fetching.
                tg.start_soon(self._cancel_on_disconnect, tg.cancel_scope)
                chunk = first
                try:
                    while chunk is not None:
                        data = bytes(chunk.bytes())
                        if reframer is not None:
                            data = await in_thread(reframer.feed, data)
                        if upgrade is not None:
                            data = upgrade.blocks(data)
                        await self.reply.body(data)
                        chunk = await in_thread(stream.fetch)
                    tail = await in_thread(reframer.finish) if reframer else b""
                    await self.reply.body(tail, last=True)
                except ClickHouseError as exc:
                    log.warning("query %s failed mid-stream: %s", req.query_id, exc.message)
                    await self.reply.fail(exc)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await run_sync(_quietly(stream.cancel))

    async def _cancel_on_disconnect(self, scope: anyio.CancelScope) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                # The server reports the end of a complete answer as a disconnect too.
                if not self.reply.finished:
                    log.info("query %s: client went away mid-result", self.req.query_id)
                    scope.cancel()
                return

    # --- INSERT with data in the body ----------------------------------------------------------
    async def _insert(self, match: re.Match[bytes]) -> None:
        req = self.req
        fmt = "Values" if match.group("values") else match.group("fmt").decode()
        assert req.data is not None
        if match.group("values") and req.params:
            # Query parameters in VALUES are substituted by the parser of the whole statement;
            # a streamed insert has no parameters, so read the (textual, small) data whole.
            data = b"".join([chunk async for chunk in req.data])
            if len(data) > MAX_QUERY_BYTES:
                raise ClickHouseError.bad_request(
                    f"INSERT ... VALUES with query parameters exceeds {MAX_QUERY_BYTES} bytes"
                )
            result = await in_thread(
                self.conn.query, req.sql + data, req.default_format, req.params
            )
            self.summary.written_rows = result.rows_written()
            self.summary.written_bytes = result.bytes_written()
        else:
            await self._stream_insert(match.group("stmt"), fmt, req.sql[match.end() :])
        await self._start(None)
        await self.reply.body(b"", last=True)

    async def _stream_insert(self, statement: bytes, fmt: str, head: bytes) -> None:
        assert self.req.data is not None
        inserter = await in_thread(self.conn.insert, statement, fmt)
        try:
            if head.strip():
                await in_thread(inserter.append, head)
            async for chunk in self.req.data:
                await in_thread(inserter.append, chunk)
            result = await in_thread(inserter.finish)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await run_sync(_quietly(inserter.cancel))
            raise
        self.summary.written_rows = result.rows_written
        self.summary.written_bytes = result.bytes_written

    # --- headers -------------------------------------------------------------------------------
    async def _start(self, result_format: str | None) -> None:
        """Send the headers; `result_format` is None for a statement that returns no result."""
        headers = {
            "Content-Type": content_type(result_format) if result_format else TEXT_PLAIN,
            "X-ClickHouse-Server-Display-Name": self.reply.display_name,
            "X-ClickHouse-Query-Id": self.req.query_id,
            "X-ClickHouse-Timezone": self.timezone,
        }
        if result_format:
            headers["X-ClickHouse-Format"] = result_format
        headers["X-ClickHouse-Summary"] = self.summary.header()
        await self.reply.start(headers, self.req.response_encoding)
