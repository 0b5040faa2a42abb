"""A recording HTTP proxy in front of the ClickHouse front: every statement a client sends, as
sent (the SQL, its URL settings and parameters, the body), then forwarded upstream.

`rewrite` (optional) changes the statement forwarded, never the one recorded: the cluster-mode
tests record the loader's `ON CLUSTER` DDL and forward `single_node(sql)`, its equivalent on
the one embedded server (which has no cluster and no Keeper). `fail_once` drops the answer of
the first request it matches after forwarding it (the server stored the rows, the client saw
a broken connection), which makes the client retry the same request.
"""

from __future__ import annotations

import http.client
import re
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lz4.frame
import zstandard


@dataclass
class Request:
    sql: str
    params: dict[str, str]  # URL parameters other than `query` (settings, `param_*`)
    body: bytes  # the data of an INSERT (empty when the SQL came in the body)


@dataclass
class Recording:
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    # A request matching it gets no answer (once); None: every request is answered.
    fail_once: Callable[[Request], bool] | None = None

    @property
    def sql(self) -> list[str]:
        return [r.sql for r in self.requests]

    @property
    def bodies(self) -> list[bytes]:
        return [r.body for r in self.requests]


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


Rewrite = Callable[[str], str]


def _decoded(body: bytes, encoding: str) -> bytes:
    """The request body as the server reads it (clickhouse-connect compresses inserts)."""
    if encoding == "lz4":
        return bytes(lz4.frame.decompress(body))
    if encoding == "zstd":
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(body))
    if encoding in ("gzip", "deflate"):
        return zlib.decompress(body, 47)  # 47: either header
    return body


def _handler(
    upstream: int,
    recording: Recording,
    rewrite: Rewrite | None,
    rewrite_param: Rewrite,
    add_params: dict[str, str],
) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Recorder(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
            pass

        def _forward(self) -> None:
            body = _read_body(self)
            split = urllib.parse.urlsplit(self.path)
            pairs = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
            params = {k: v for k, v in pairs if k != "query"}
            in_url = [v for k, v in pairs if k == "query"]
            plain = _decoded(body, self.headers.get("Content-Encoding", ""))
            if in_url:
                request = Request(in_url[0], params, plain)
            elif plain.startswith(b"INSERT"):  # Native inserts: the statement, then the data
                head, _, data = plain.partition(b"\n")
                request = Request(head.decode(errors="replace"), params, data)
            else:
                request = Request(plain.decode(errors="replace"), params, b"")
            recording.requests.append(request)
            path, sent = self.path, body
            if add_params:
                pairs += list(add_params.items())
                path = split._replace(query=urllib.parse.urlencode(pairs)).geturl()
            if rewrite is not None and not self.headers.get("Content-Encoding"):
                change = {k: rewrite_param for k, _ in pairs if k.startswith("param_")}
                change["query"] = rewrite
                pairs = [(k, change[k](v) if k in change else v) for k, v in pairs]
                path = split._replace(query=urllib.parse.urlencode(pairs)).geturl()
                if not in_url and request.sql and not request.body:  # SQL alone in the body
                    sent = rewrite(request.sql).encode()
            skip = {"transfer-encoding", "content-length", "connection", "host"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=120)
            conn.request(self.command, path, body=sent, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            with lock:
                drop = recording.fail_once is not None and recording.fail_once(request)
                if drop:
                    recording.fail_once = None
            if drop:
                self.close_connection = True
                return  # no answer at all: the client sees the connection closed
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in {"transfer-encoding", "content-length", "connection"}:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _forward

    return Recorder


@contextmanager
def recording_proxy(
    upstream_port: int,
    rewrite: Rewrite | None = None,
    rewrite_param: Rewrite = str,
    add_params: dict[str, str] | None = None,
) -> Iterator[Recording]:
    """A proxy on a free port of 127.0.0.1 to the ClickHouse front on `upstream_port`;
    `rewrite` / `rewrite_param` (used only with `rewrite`) change the forwarded query and
    `param_*` values; `add_params` are added to every forwarded URL (e.g. `compatibility`)."""
    recording = Recording()
    handler = _handler(upstream_port, recording, rewrite, rewrite_param, add_params or {})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    recording.port = proxy.server_address[1]
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield recording
    finally:
        proxy.shutdown()
        proxy.server_close()


# What the embedded engine cannot run, and its single-server equivalent (one shard, one replica).
ON_CLUSTER = re.compile(r"""\s+ON\s+CLUSTER\s+(?:'[^']*'|`[^`]*`|"[^"]*"|\w+)""", re.IGNORECASE)
REPLICATED = re.compile(r"\bReplicated(\w*MergeTree)\(\s*'[^']*'\s*,\s*'[^']*'\s*(?:,\s*)?")
CLUSTER_TABLE = re.compile(r"""\bcluster(?:AllReplicas)?\(\s*["'][^"']*["']\s*,\s*([\w.]+)\s*\)""")
# `raw.tasks_local`, or as dbt quotes it, `analytics`.`task_events_local`
LOCAL = re.compile(r"\b(raw|ops|analytics)(`?\.`?)(\w+)_local\b")
# the loader's, and dbt's (after its `/* {...} */` header, lower case, `or replace`)
DISTRIBUTED_CREATE = re.compile(
    r"^\s*(?:/\*.*?\*/\s*)?CREATE (?:OR REPLACE )?TABLE .*\sENGINE = Distributed\(",
    re.DOTALL | re.IGNORECASE,
)
# a create that already has settings, or is filled from a query: no window appended
HAS_TAIL = re.compile(r"\bSETTINGS\b|\bAS\s+SELECT\b|\bEMPTY\s+AS\b", re.IGNORECASE)
# Keeps the last 1,000 insert tokens of each table, as a replicated table does in Keeper.
DEDUP_WINDOW = "SETTINGS non_replicated_deduplication_window = 1000"


def single_node(sql: str) -> str:
    """A cluster statement as the one embedded server runs it: without `ON CLUSTER` (and
    `cluster('<name>', t)` reads only `t`, from shard 1), the
    replicated local table becomes the table itself (plain engine, same name as its Distributed
    table, with a deduplication window so that tokens are honoured), the Distributed table a
    no-op (on one shard it would be the local table).

    What it cannot prove: that the cluster statements run on a cluster (Keeper paths, `{uuid}`,
    distributed DDL, routing by the sharding key); and a Distributed table whose local table has
    another name (dbt's `__dbt_distributed_new_data` of an incremental `distributed_incremental`
    run) has nothing behind it here, so only the first build of a distributed model runs."""
    if DISTRIBUTED_CREATE.match(sql):
        return "SELECT 1"
    local_create = bool(re.match(r"^\s*(?:/\*.*?\*/\s*)?CREATE TABLE", sql, re.I | re.S)) and (
        "_local" in sql
    )
    out = ON_CLUSTER.sub("", CLUSTER_TABLE.sub(r"\1", sql)).replace("_shard_num", "1")
    out = LOCAL.sub(r"\1\2\3", REPLICATED.sub(r"\1(", out))
    if local_create and "MergeTree" in out and not HAS_TAIL.search(out):
        out += "\n" + DEDUP_WINDOW
    return out.replace("MergeTree()", "MergeTree")


def single_node_param(value: str) -> str:
    """A `param_*` value naming a local table (`system.tables` lookups) names the table."""
    return value.removesuffix("_local")
