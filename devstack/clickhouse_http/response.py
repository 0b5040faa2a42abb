"""Writing a response as ClickHouse's HTTP handler does: status, headers, body, errors.

Headers (src/Server/HTTPHandler.cpp, src/Interpreters/executeQuery.cpp):
- always `X-ClickHouse-Server-Display-Name`; once the query has an id, `X-ClickHouse-Query-Id`
  (generated when the client sent none) and `X-ClickHouse-Timezone` (after the statement ran, so
  a `SET session_timezone` shows);
- `X-ClickHouse-Format` and the format's Content-Type only for a statement that returns a result
  set; DDL, INSERT, SET, ... get neither (Content-Type stays text/plain), so clients read their
  summary instead of an empty result;
- `X-ClickHouse-Summary`: the statement's progress when the headers are sent;
- on an error before the body started: ClickHouse's status for the code,
  `X-ClickHouse-Exception-Code`, and the message as the body. After the body started, the
  status is already 200: the error is written into the body in ClickHouse's exception block.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from devstack.clickhouse_http.errors import ClickHouseError

TEXT_PLAIN = "text/plain; charset=UTF-8"
_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "csvwithnamesandtypes": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsonstrings": "application/json; charset=UTF-8",
    "jsoncompactstrings": "application/json; charset=UTF-8",
    "xml": "application/xml; charset=UTF-8",
}
_BINARY_FORMATS = ("native", "rowbinary", "parquet", "arrow", "orc", "avro", "msgpack", "protobuf")

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


def content_type(fmt: str) -> str:
    name = fmt.lower()
    if name in _CONTENT_TYPES:
        return _CONTENT_TYPES[name]
    if name.startswith(("tabseparated", "tsv")):
        return _CONTENT_TYPES["tsv"]
    if name.startswith(_BINARY_FORMATS):
        return "application/octet-stream"
    return TEXT_PLAIN


@dataclass
class Summary:
    """The statement's progress, for `X-ClickHouse-Summary`."""

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


def encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


def error_headers(
    exc: ClickHouseError, display_name: str, query_id: str = "", timezone: str = ""
) -> dict[str, str]:
    headers = {
        "Content-Type": TEXT_PLAIN,
        "X-ClickHouse-Server-Display-Name": display_name,
        "X-ClickHouse-Exception-Code": str(exc.code),
    }
    if query_id:  # known once the request was read: ClickHouse sends it with the error
        headers["X-ClickHouse-Query-Id"] = query_id
    if timezone:
        headers["X-ClickHouse-Timezone"] = timezone
    return headers


def error_body(exc: ClickHouseError) -> bytes:
    return exc.message.rstrip("\n").encode() + b"\n"


def exception_block(tag: str, message: str) -> bytes:
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
