{% macro task_events_changed_task_ids() -%}
    {#-
        Ids of tasks with a raw row loaded after the newest load already reflected in
        `task_events` (`this`). `task_events._loaded_at` is the max over all raw rows of a task,
        so its max is the cursor. Rows stamped exactly at the cursor are re-checked against the
        target, because a load sharing that millisecond may have committed after the last run
        read `raw`; already-applied pairs are skipped so the boundary batch is not redone.
        Cost: a scan of two narrow columns of `raw.tasks`, then primary-key lookups.
    -#}
    select distinct _id
    from {{ source('mongo', 'tasks') }}
    where
        _loaded_at > (select max(_loaded_at) from {{ this }})
        or (
            _loaded_at = (select max(_loaded_at) from {{ this }})
            and (_id, _loaded_at) not in (
                select
                    task_id,
                    _loaded_at
                from {{ this }}
                where _loaded_at = (select max(_loaded_at) from {{ this }})
            )
        )
{%- endmacro %}

{% macro task_events_indexes() -%}
    {{ return([
        {'name': 'idx_task_id', 'definition': 'task_id TYPE bloom_filter GRANULARITY 1'},
        {'name': 'idx_loaded_at', 'definition': '_loaded_at TYPE minmax GRANULARITY 1'},
    ]) }}
{%- endmacro %}

{% macro task_events_cluster_indexes() %}
    {#-
        post-hook of task_events on a cluster: dbt-clickhouse adds a model's `indexes` only to a
        single-server table (no ON CLUSTER, and not to a distributed model's local table), so
        here they go to the local table on every server. Idempotent; nothing without a cluster.
    -#}
    {% if not execute or not is_clustered() %}{{ return("") }}{% endif %}
    {% set local = local_relation(this) %}
    {% set adds = [] %}
    {% for index in task_events_indexes() %}
        {% do adds.append("add index if not exists " ~ index.name ~ " " ~ index.definition) %}
    {% endfor %}
    {% call statement('task_events: indexes', auto_begin=false) -%}
        alter table {{ local }} {{ on_cluster_clause(this) }} {{ adds | join(', ') }}
    {%- endcall %}
    {{ return("") }}
{% endmacro %}
