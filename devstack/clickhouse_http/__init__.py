"""ClickHouse's HTTP interface in front of the embedded ClickHouse engine (chdb).

chdb runs the ClickHouse engine inside a Python process, and only one process may open a data
directory; this server is that process, and speaks the HTTP protocol that clickhouse-connect,
dbt-clickhouse and curl use against a real ClickHouse server:

    python -m devstack.clickhouse_http --data-dir .data/clickhouse --port 8123

The parts, in the order a request meets them:

- `limits.py`     ClickHouse's limits on the request line, headers and form fields
- `request.py`    URL parameters, credentials, the query and its body (INSERT data, forms,
                  external data); `codecs.py` decompresses bodies and compresses answers
- `sessions.py`   HTTP sessions (`session_id`): one engine connection each, locked per request,
                  closed after `session_timeout` with their temporary tables
- `admission.py`  how many statements run at once, and what waits (logged, `/status`)
- `handler.py`    one request: settings, external tables, the statement, streaming the answer
- `engine.py`     chdb and its connections
- `response.py`   status, headers and bodies as ClickHouse writes them; `native.py` adapts
                  Native output to the client's `client_protocol_version`
- `errors.py`     ClickHouse's error codes, texts and HTTP statuses
- `statements.py` what the front needs to know about a statement's text
- `server.py`     routes, start-up and shutdown, the command line

What the embedded engine cannot do (users, clusters, the native TCP port, ...) is listed in
docs/ARCHITECTURE.md.
"""

from devstack.clickhouse_http.config import ServerConfig
from devstack.clickhouse_http.server import build_app, main, serve

__all__ = ["ServerConfig", "build_app", "main", "serve"]
