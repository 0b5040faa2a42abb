"""The embedded stack of real servers for development, tests and CI.

`devstack.stack.Stack` starts and stops MongoDB, ClickHouse (the HTTP front in
`devstack.clickhouse_http`) and Redis; `python -m devstack up|down|status` is its command line.
Kept import-free so the server processes start without loading the client libraries.
"""
