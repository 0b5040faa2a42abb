{#-
    Cluster mode: the profile's `cluster:` (the `prod` target reads CLICKHOUSE_CLUSTER). Model
    configs and macros choose their cluster variant through these macros only, so that without a
    cluster every statement is exactly the single-server one. docs/SCALING.md ("The dbt side"):
    per model, the materialization, engine and sharding key, and why.
-#}

{% macro is_clustered() -%}
    {{ return((target.get('cluster') or '') | trim != '') }}
{%- endmacro %}

{% macro when_clustered(clustered, single) -%}
    {#- `clustered` on a cluster, `single` otherwise (any value: a config, a name, a list) -#}
    {{ return(clustered if is_clustered() else single) }}
{%- endmacro %}

{% macro cluster_engine(engine, shard='{shard}') -%}
    {#-
        `engine` as written without a cluster; on a cluster its replicated variant:
        `ReplacingMergeTree(rank)` -> `ReplicatedReplacingMergeTree('/clickhouse/tables/{uuid}/{shard}',
        '{replica}', rank)`. The Keeper path holds the table's `{uuid}` (the same on every server of
        an ON CLUSTER create), not its name: dbt builds tables under temporary names and renames or
        exchanges them, and a path named after the table would follow neither.
        `shard='all'`: one replica set spanning every server (a small table every shard joins).
    -#}
    {% if not is_clustered() %}{{ return(engine) }}{% endif %}
    {% set name, paren, rest = engine.strip().partition('(') %}
    {% set args = rest.strip()[:-1].strip() if paren else '' %}
    {% set keeper = "'/clickhouse/tables/{uuid}/" ~ shard ~ "', '{replica}'" %}
    {{ return('Replicated' ~ name.strip() ~ '(' ~ keeper ~ (', ' ~ args if args else '') ~ ')') }}
{%- endmacro %}

{% macro local_relation(relation) -%}
    {#- on a cluster, the replicated local table under the Distributed `relation`; else `relation` -#}
    {% if not is_clustered() %}{{ return(relation) }}{% endif %}
    {{ return(relation.incorporate(path={"identifier": relation.identifier ~ adapter.get_clickhouse_local_suffix()})) }}
{%- endmacro %}

{% macro on_cluster() -%}
    {#- `ON CLUSTER "<name>"` on a cluster, empty otherwise (whatever relation the DDL names) -#}
    {%- if is_clustered() %}ON CLUSTER {{ adapter.get_clickhouse_cluster_name() }}{% endif -%}
{%- endmacro %}

{% macro distributed_engine(local, sharding_key) -%}
    {#- the Distributed engine over the local table `local` on every shard of the cluster -#}
    {%- set cluster = adapter.get_clickhouse_cluster_name()[1:-1] -%}
    Distributed('{{ cluster }}', '{{ local.schema }}', '{{ local.identifier }}', {{ sharding_key }})
{%- endmacro %}

{% macro clickhouse__get_create_sql(relation, sql) -%}
    {#-
        dbt's `get_create_sql` for this adapter; here only the test materialization calls it, to
        store a warned test's failing rows. On a cluster that table is created ON CLUSTER (its
        engine, from the tests' `+engine` in dbt_project.yml, replicated on every server), so the
        flow finds it whichever server it reads; dbt drops the previous one on its own server
        only, so it is dropped ON CLUSTER first. Without a cluster: dbt's own, unchanged.
    -#}
    {%- if is_clustered() and relation.is_table -%}
        {%- set relation = relation.incorporate(can_on_cluster=true) -%}
        {%- do run_query("drop table if exists " ~ relation ~ " " ~ on_cluster() ~ " sync") -%}
    {%- endif -%}
    {{ default__get_create_sql(relation, sql) }}
{%- endmacro %}
