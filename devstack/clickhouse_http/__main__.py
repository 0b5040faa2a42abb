from devstack.clickhouse_http.server import main

main()
