"""Cluster mode (`CLICKHOUSE_CLUSTER`): what the loader, its repairs and `dbt build` send,
statement by statement.

The embedded engine has no cluster and no Keeper, so the loader and dbt run end to end through a
recording proxy that records each statement as sent and forwards its single-server equivalent
(`clickhouse_recorder.single_node`: no `ON CLUSTER`, plain engines with a deduplication window,
the Distributed table a no-op). This proves what they *send*; it does not prove that a
real cluster behaves (replication, sharding, distributed DDL): deploy/ is for that.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect
import pyarrow as pa
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_recorder import Recording, Request, recording_proxy, single_node, single_node_param
from pymongo import MongoClient

from devstack.process import free_ports
from devstack.stack import Stack
from flows import ops
from loader import store
from loader.clients import open_clients_now
from loader.cluster import arrow_payload, dedup_token, rows_payload
from loader.reconcile import reconcile_collection
from loader.schema import all_tables, local_table
from loader.settings import Settings
from loader.state import settle_files
from loader.sync import sync_collection
from synthetic import seed

CLUSTER = "pipeline"
DB = "cluster_test"
DDL = re.compile(r"^\s*(CREATE|ALTER|DROP|TRUNCATE|RENAME|EXCHANGE)\b", re.IGNORECASE)
INSERT = re.compile(r"^\s*INSERT\s+INTO\s+([\w.]+)", re.IGNORECASE)


REPO = Path(__file__).resolve().parents[2]
DBT_DDL = re.compile(
    r"^\s*(?:/\*.*?\*/)?\s*(create|alter|drop|truncate|rename|exchange)\b", re.I | re.S
)


@dataclass
class Run:
    recording: Recording
    client: Client  # straight to the private engine, for what it stored
    loader: list[str]  # the statements the loader and the flow's bookkeeping sent
    dbt: list[str]  # the statements `dbt build` sent, in cluster mode


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, stack: Stack) -> Iterator[Stack]:
    """A ClickHouse front of its own (the session's has single-server loader tables already);
    MongoDB stays the session's."""
    mongo_port, clickhouse_port, redis_port = free_ports(3)
    private = Stack(tmp_path_factory.mktemp("cluster"), mongo_port, clickhouse_port, redis_port)
    private.up(["clickhouse"])
    try:
        yield private
    finally:
        private.down(["clickhouse"])


def direct(engine: Stack) -> Client:
    return clickhouse_connect.get_client(host="127.0.0.1", port=engine.clickhouse_port)


def settings_for(stack: Stack, port: int, cluster: str) -> Settings:
    return Settings(
        mongo_uri=stack.mongo_uri,
        mongo_db=DB,
        clickhouse_port=port,
        clickhouse_cluster=cluster,
        retry_attempts=3,
        retry_initial_wait=0.05,
        retry_max_wait=0.2,
    )


def is_raw_tasks_insert(request: Request) -> bool:
    match = INSERT.match(request.sql)
    return bool(match) and match.group(1) == "raw.tasks"


@pytest.fixture(scope="module")
def run(engine: Stack, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Seed, then sync both collections in cluster mode, the first raw.tasks insert losing its
    answer after the engine stored it (so the loader retries that batch); the flow's tables
    too; then `dbt build` with the `prod` profile's `cluster:`."""
    tmp = tmp_path_factory.mktemp("cluster_dbt")
    with MongoClient(stack.mongo_uri) as mongo:
        mongo.drop_database(DB)
        seed(mongo[DB], 300, seed=3, malformed_ratio=0.02)
    with (
        pytest.MonkeyPatch.context() as env,
        recording_proxy(engine.clickhouse_port, single_node, single_node_param) as recording,
    ):
        env.setenv("CLICKHOUSE_CLUSTER", CLUSTER)  # what the writes holding only a client read
        recording.fail_once = is_raw_tasks_insert
        settings = settings_for(stack, recording.port, CLUSTER)
        for collection in ("tasks", "employee"):
            sync_collection(settings, collection, batch_size=100)
        clients = open_clients_now(settings)
        try:
            ops.ensure_tables(clients.clickhouse, CLUSTER)
            ops.insert_rows(
                clients.clickhouse,
                "ops.alerts",
                ops.ALERT_COLUMNS,
                [(ops.now(), "r1", "drift", "tasks", 1.0, 0.0, "a test alert")],
            )
        finally:
            clients.close()
        loader_requests = len(recording.requests)
        dbt_build(recording.port, tmp)
    client = direct(engine)
    try:
        sql = recording.sql
        yield Run(recording, client, sql[:loader_requests], sql[loader_requests:])
    finally:
        client.close()


def dbt_build(port: int, tmp: Path, *extra: str, cluster: str = CLUSTER) -> None:
    """`dbt build` of the repo's project, target `prod` (`cluster:` from CLICKHOUSE_CLUSTER)."""
    shutil.copy(REPO / "profiles.yml.example", tmp / "profiles.yml")
    env = {
        **os.environ,
        "CLICKHOUSE_HOST": "127.0.0.1",
        "CLICKHOUSE_PORT": str(port),
        "CLICKHOUSE_USER": "default",
        "CLICKHOUSE_PASSWORD": "",
        "CLICKHOUSE_CLUSTER": cluster,
        "DBT_TARGET": "prod",
    }
    dbt = [str(Path(sys.executable).parent / "dbt")]
    args = ["build", "--profiles-dir", str(tmp), "--project-dir", str(REPO)]
    args += ["--target-path", str(tmp / "target"), "--log-path", str(tmp / "logs"), *extra]
    done = subprocess.run(dbt + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]


def ddl_of(run: Run) -> list[str]:
    return [sql for sql in run.loader if DDL.match(sql)]


def test_every_ddl_of_the_loader_and_the_flow_runs_on_the_cluster(run: Run) -> None:
    statements = ddl_of(run)
    assert len(statements) > 20
    assert [s[:80] for s in statements if f" ON CLUSTER '{CLUSTER}'" not in s] == []


def test_every_table_is_a_replicated_local_table_under_a_distributed_one(run: Run) -> None:
    creates = [s for s in ddl_of(run) if s.startswith("CREATE TABLE")]
    tables = all_tables() + (ops.STEP_TIMINGS, ops.ALERTS)
    for table in tables:
        local = local_table(table, CLUSTER)
        [create_local] = [s for s in creates if s.split()[5] == local.qualified]
        assert re.search(
            r"ENGINE = Replicated\w*MergeTree\('/clickhouse/tables/\{shard\}/\{database\}/"
            r"\{table\}', '\{replica\}'",
            create_local,
        ), create_local
        [create_distributed] = [s for s in creates if s.split()[5] == table.qualified]
        assert create_distributed.endswith(
            f"ENGINE = Distributed('{CLUSTER}', '{table.database}', '{local.name}', "
            f"{table.shard_key})"
        )
    assert len(creates) == 2 * len(tables)


def test_every_version_of_a_document_goes_to_one_shard(run: Run) -> None:
    """The sharding key of raw tables is the document id: versions of a task meet on one shard
    (FINAL collapses them there) even when the task moves to another file."""
    for create in (s for s in ddl_of(run) if "ENGINE = Distributed('" in s):
        if " raw." in create:
            assert create.endswith("cityHash64(_id))"), create


def inserts(run: Run) -> list[Request]:
    return [r for r in run.recording.requests[: len(run.loader)] if INSERT.match(r.sql)]


def test_every_insert_of_the_loader_and_the_flow_carries_a_dedup_token(run: Run) -> None:
    sent = inserts(run)
    tables = {INSERT.match(r.sql).group(1) for r in sent}  # type: ignore[union-attr]
    assert {"raw.tasks", "raw.employee", "raw.rejects", "ops.alerts"} <= tables
    without = sorted(
        {
            INSERT.match(r.sql).group(1)  # type: ignore[union-attr]
            for r in sent
            if not r.params.get("insert_deduplication_token")
            or r.params.get("deduplicate_blocks_in_dependent_materialized_views") != "1"
            or r.params.get("distributed_foreground_insert") != "1"
        }
    )
    assert without == []


def test_a_retried_batch_carries_the_same_token_and_is_stored_once(run: Run) -> None:
    tasks = [r for r in inserts(run) if is_raw_tasks_insert(r)]
    tokens = [r.params["insert_deduplication_token"] for r in tasks]
    assert tokens[0] == tokens[1], "the first batch lost its answer and was sent again"
    assert len(set(tokens)) == len(tokens) - 1  # every other batch has a token of its own
    stored = run.client.command("SELECT count() FROM raw.tasks")
    distinct = run.client.command("SELECT uniqExact(_id) FROM raw.tasks")
    assert stored == distinct  # the retried batch is there once


def test_without_the_setting_nothing_of_cluster_mode_is_sent(
    engine: Stack, stack: Stack, tmp_path: Path
) -> None:
    """Same code, no `CLICKHOUSE_CLUSTER`: the single-server statements of today, no tokens."""
    with MongoClient(stack.mongo_uri) as mongo:
        seed(mongo[DB], 50, seed=4)
    with recording_proxy(engine.clickhouse_port) as recording:
        settings = settings_for(stack, recording.port, "")
        engine_client = direct(engine)
        try:
            for db in ("raw", "ops"):
                engine_client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
        finally:
            engine_client.close()
        sync_collection(settings, "tasks", batch_size=20)
    sent = recording.requests
    assert any(r.sql.startswith("CREATE TABLE IF NOT EXISTS raw.tasks (") for r in sent)
    text = "\n".join(r.sql for r in sent)
    assert "ON CLUSTER" not in text and "Replicated" not in text and "Distributed" not in text
    assert not [r for r in sent if "insert_deduplication_token" in r.params]
    assert [t.create_sql() for t in all_tables()] == [
        s for s in (r.sql for r in sent) if s.startswith("CREATE TABLE")
    ]


def test_a_token_is_a_function_of_the_batch_alone() -> None:
    """A batch rebuilt from the same rows (not only the same request sent again) gets the same
    token; another batch, or the same rows for another table, another one."""
    rows = [("a", 1, 2.5), ("b", 2, None)]
    batch = pa.table({"k": ["a", "b"], "v": [1, 2]})
    same = pa.table({"k": ["a", "b"], "v": [1, 2]})
    token = dedup_token("raw.tasks", arrow_payload(batch))
    assert token == dedup_token("raw.tasks", arrow_payload(same))
    assert token != dedup_token("raw.tasks", arrow_payload(pa.table({"k": ["a"], "v": [1]})))
    assert token != dedup_token("raw.employee", arrow_payload(same))
    names = ["k", "v", "w"]
    assert dedup_token("t", rows_payload(names, rows)) == dedup_token(
        "t", rows_payload(names, list(rows))
    )
    assert dedup_token("t", rows_payload(names, rows)) != dedup_token(
        "t", rows_payload(names, rows[:1])
    )


DBT_HEADER = re.compile(r"^\s*/\*.*?\*/\s*", re.S)


def dbt_ddl(run: Run) -> list[str]:
    """dbt's DDL statements, whitespace collapsed, without dbt's `/* {...} */` header."""
    return [" ".join(DBT_HEADER.sub("", sql).split()) for sql in run.dbt if DBT_DDL.match(sql)]


def test_dbt_builds_its_models_on_the_cluster(run: Run) -> None:
    """What dbt-clickhouse does from the profile's `cluster:` alone: every model's view or
    table is created ON CLUSTER."""
    names = "|".join(p.stem for p in (REPO / "models").rglob("*.sql"))
    model = re.compile(rf"create (or replace view|table) `analytics`\.`({names})`")
    models = [s for s in dbt_ddl(run) if model.search(s)]
    assert len(models) >= 10
    assert [s[:120] for s in models if 'ON CLUSTER "pipeline"' not in s] == []


def test_every_dbt_ddl_runs_on_the_cluster_with_replicated_engines(run: Run) -> None:
    """Every DDL of `dbt build` in cluster mode: ON CLUSTER, and every MergeTree replicated.
    Left out: dbt-clickhouse's `__dbt_exchange_test` probe, and the `create temporary table`s
    of unit tests (session-scoped, engine Memory: nothing of them outlives the request)."""
    statements = [
        s
        for s in dbt_ddl(run)
        if "__dbt_exchange_test" not in s and not s.startswith("create temporary table")
    ]
    off_cluster = [s[:200] for s in statements if "ON CLUSTER" not in s]
    not_replicated = [
        s[:200]
        for s in statements
        if re.search(r"engine\s*=?\s*(\w*)MergeTree", s, re.I)
        and not re.search(r"engine\s*=?\s*Replicated", s, re.I)
    ]
    assert off_cluster == [] and not_replicated == []


@pytest.fixture(scope="module")
def repairs(
    run: Run, engine: Stack, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> list[Request]:
    """After `run`, in cluster mode, the paths that write outside a sync's batches: five tasks
    deleted in MongoDB and a reconcile (id sets, its INSERT ... SELECT, tombstones by
    INSERT ... SELECT), the follower's settle of their files and a resume-token save, a full
    refresh of employee (truncate), and `dbt build --full-refresh -s task_events` (the store
    rebuilt next to the old one and exchanged)."""
    tmp = tmp_path_factory.mktemp("cluster_repairs")
    with MongoClient(stack.mongo_uri) as mongo:
        tasks = mongo[DB]["tasks"]
        # the current task of files that have another one: the settle replaces their row
        tops = tasks.aggregate(
            [
                {"$match": {"assigned_at": {"$type": "date"}, "file_id": {"$type": "string"}}},
                {"$sort": {"assigned_at": -1, "_id": -1}},
                {"$group": {"_id": "$file_id", "top": {"$first": "$_id"}, "n": {"$sum": 1}}},
                {"$match": {"n": {"$gte": 2}}},
                {"$sort": {"_id": 1}},
                {"$limit": 5},
            ]
        )
        gone = [d["top"] for d in tops]
        tasks.delete_many({"_id": {"$in": gone}})
    with (
        pytest.MonkeyPatch.context() as env,
        recording_proxy(engine.clickhouse_port, single_node, single_node_param) as recording,
    ):
        env.setenv("CLICKHOUSE_CLUSTER", CLUSTER)
        env.setattr(store, "FEW_TOMBSTONES", 0)  # the INSERT ... SELECT path, as for many ids
        settings = settings_for(stack, recording.port, CLUSTER)
        assert reconcile_collection(settings, "tasks").deletes == len(gone)
        clients = open_clients_now(settings)
        try:
            files = clients.clickhouse.query(
                "SELECT DISTINCT file_id FROM raw.tasks WHERE is_deleted = 1"
            ).result_rows
            assert settle_files(clients, [f for (f,) in files]) > 0
            store.save_resume_token(clients, "tasks", {"_data": "8263"}, 1)
        finally:
            clients.close()
        sync_collection(settings, "employee", full_refresh=True, batch_size=100)
        dbt_build(recording.port, tmp, "--full-refresh", "--select", "task_events")
    return recording.requests


def statements_like(requests: list[Request], pattern: str) -> list[Request]:
    found = [r for r in requests if re.search(pattern, r.sql, re.I | re.S)]
    assert found, f"nothing sent like {pattern}"
    return found


def test_dbt_models_are_replicated_local_tables_under_distributed_ones(run: Run) -> None:
    """task_events and mart_daily_throughput: a Replicated local table on every shard and a
    Distributed table by the doc's key; mart_employees: one replica set over every server."""
    ddl = dbt_ddl(run)
    for model, key in (
        ("task_events", "cityHash64(file_id)"),
        ("mart_daily_throughput", "cityHash64(stage)"),
    ):
        local = [s for s in ddl if s.startswith(f"create table `analytics`.`{model}_local`")]
        assert local and all(
            "engine = ReplicatedMergeTree('/clickhouse/tables/{uuid}/{shard}', '{replica}')" in s
            for s in local
        ), local
        dist = [s for s in ddl if re.match(rf"create or replace table `analytics`\.`{model}` ", s)]
        engine = f"ENGINE = Distributed('{CLUSTER}', 'analytics', '{model}_local', {key})"
        assert dist and all(s.endswith(engine) for s in dist), dist
    employees = [s for s in ddl if re.match(r"create table `analytics`\.`mart_employees", s)]
    assert employees and all(
        "ReplicatedMergeTree('/clickhouse/tables/{uuid}/all', '{replica}')" in s for s in employees
    )


def test_task_events_indexes_go_to_its_local_table_on_the_cluster(run: Run) -> None:
    [alter] = [s for s in dbt_ddl(run) if s.startswith("alter table")]
    local = f'alter table `analytics`.`task_events_local` ON CLUSTER "{CLUSTER}" '
    assert alter.startswith(local + "add index if not exists idx_task_id")
    assert "add index if not exists idx_loaded_at" in alter


def test_pipeline_state_store_and_members_are_sharded_by_file(run: Run) -> None:
    ddl = dbt_ddl(run)
    for name, engine in (
        (
            "store",
            "ReplicatedReplacingMergeTree('/clickhouse/tables/{uuid}/{shard}', '{replica}', rank)",
        ),
        (
            "members",
            "ReplicatedReplacingMergeTree('/clickhouse/tables/{uuid}/{shard}', '{replica}')",
        ),
    ):
        [local] = [
            s
            for s in ddl
            if s.startswith(f"create table `analytics`.`pipeline_state_{name}_local` ON CLUSTER")
        ]
        assert f"engine = {engine}" in local, local
        [dist] = [
            s
            for s in ddl
            if s.startswith(f"create table `analytics`.`pipeline_state_{name}` ON CLUSTER")
        ]
        local_name = f"pipeline_state_{name}_local"
        assert dist.endswith(
            f"ENGINE = Distributed('{CLUSTER}', 'analytics', '{local_name}', cityHash64(file_id))"
        ), dist


def test_pipeline_state_views_trigger_on_local_raw_and_write_to_the_distributed_store(
    run: Run,
) -> None:
    views = [s for s in dbt_ddl(run) if s.startswith("create materialized view")]
    assert len(views) == 2 * 2  # built by the swap, then `if not exists` by create_views
    for s in views:
        assert re.search(r"to `analytics`\.`pipeline_state_(store|members)` as ", s), s
        assert "from `raw`.`tasks_local`" in s, s


def test_pipeline_state_scratch_and_pending_tables_are_replicated_on_every_server(run: Run) -> None:
    pending = [
        s
        for s in dbt_ddl(run)
        if "`pipeline_state_pending` ON CLUSTER" in s and s.startswith("create")
    ]
    assert pending and all(
        "ReplicatedMergeTree('/clickhouse/tables/{uuid}/all', '{replica}')" in s for s in pending
    )


def test_a_full_refresh_exchanges_the_local_stores_on_the_cluster(repairs: list[Request]) -> None:
    [exchange] = statements_like(
        repairs, r"exchange tables `analytics`\.`pipeline_state_store_next_local`"
    )
    assert exchange.sql.rstrip().endswith(
        f'and `analytics`.`pipeline_state_store_local` ON CLUSTER "{CLUSTER}"'
    )


def test_settle_deletes_from_the_local_store_and_inserts_with_a_token(
    repairs: list[Request],
) -> None:
    [delete] = statements_like(repairs, r"^DELETE FROM analytics\.pipeline_state_store")
    assert delete.sql.startswith(
        f"DELETE FROM analytics.pipeline_state_store_local ON CLUSTER '{CLUSTER}' "
    )
    for insert in statements_like(repairs, r"^INSERT INTO analytics\.pipeline_state_store "):
        assert insert.params.get("insert_deduplication_token"), insert.sql


def test_a_full_refresh_truncates_the_local_tables_on_the_cluster(repairs: list[Request]) -> None:
    [truncate] = statements_like(repairs, r"^TRUNCATE TABLE")
    assert truncate.sql == f"TRUNCATE TABLE IF EXISTS raw.employee_local ON CLUSTER '{CLUSTER}'"
    [rejects] = statements_like(repairs, r"^DELETE FROM raw\.rejects")
    assert rejects.sql.startswith(f"DELETE FROM raw.rejects_local ON CLUSTER '{CLUSTER}' ")


def test_every_insert_of_the_repairs_carries_a_dedup_token(repairs: list[Request]) -> None:
    """Reconcile's INSERT ... SELECT, the tombstones', the settle's, the resume token's."""
    sent = [r for r in repairs if INSERT.match(r.sql)]
    tables = {INSERT.match(r.sql).group(1) for r in sent}  # type: ignore[union-attr]
    assert {
        "ops.id_sets",
        "raw.tasks",
        "ops.change_stream_state",
        "analytics.pipeline_state_store",
    } <= tables
    assert (
        sorted({r.sql[:60] for r in sent if not r.params.get("insert_deduplication_token")}) == []
    )


def test_id_set_queries_join_shard_locally(repairs: list[Request]) -> None:
    """A query reading an id set next to raw rows: both sharded by the id, each shard matches
    its own (distributed_product_mode = 'local')."""
    using = statements_like(
        repairs, r"FROM ops\.id_sets WHERE set_id = '[0-9a-f]+'\).*raw\.|raw\.tasks.*ops\.id_sets"
    )
    assert [r.sql[:80] for r in using if r.params.get("distributed_product_mode") != "local"] == []


def test_without_a_cluster_dbt_sends_nothing_of_cluster_mode(
    repairs: list[Request], engine: Stack, tmp_path: Path
) -> None:
    """The same project, `cluster:` empty, on the tables the cluster builds left (so task_events
    takes its incremental path): no ON CLUSTER, no Replicated or Distributed engine, no local
    table, and the single-server engines and index statement of today."""
    with recording_proxy(engine.clickhouse_port) as recording:
        dbt_build(recording.port, tmp_path, "--full-refresh", cluster="")
    text = "\n".join(recording.sql)
    for cluster_only in ("ON CLUSTER", "Replicated", "Distributed", "_local", "{uuid}"):
        assert cluster_only not in text
    ddl = [" ".join(DBT_HEADER.sub("", sql).split()) for sql in recording.sql]
    alters = [s for s in ddl if s.upper().startswith("ALTER TABLE `ANALYTICS`.`TASK_EVENTS")]
    assert any("ADD INDEX idx_task_id" in s for s in alters), alters
    store = re.compile(
        r"create table `analytics`\.`pipeline_state_store(_next)?` "
        r"engine = ReplacingMergeTree\(rank\)"
    )
    assert any(store.match(s) for s in ddl), [s[:100] for s in ddl if "pipeline_state_store" in s]


def test_the_settle_reads_the_views_with_global_subqueries(repairs: list[Request]) -> None:
    """The views filter by a subquery on the members, sharded by file while raw is sharded by
    task: it runs once and goes to every shard (distributed_product_mode = 'global')."""
    reads = statements_like(  # the follower runs the views' SELECT text
        repairs, r"^SELECT kind, file_id, rank, .* FROM \(.*analytics\.pipeline_state_members"
    )
    assert [r.sql[:80] for r in reads if r.params.get("distributed_product_mode") != "global"] == []
