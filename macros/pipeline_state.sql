{#-
    The state behind `pipeline_state`, kept by ClickHouse rather than recomputed per read:

    - `pipeline_state_store`: ReplacingMergeTree(rank) ORDER BY file_id. Every candidate current
      task of a file is a row; the engine keeps, per file, the row with the highest `rank`, which
      packs (assigned_at, task_id, _version) into one UInt256 (see pipeline_state_rank), so
      "latest assigned_at, ties broken by task_id" is exactly the order of the naive
      `argMax(..., (assigned_at, _id))`, and a newer version of the same task wins over its
      older versions when assigned_at is unchanged. Reads use FINAL: a streaming merge of a few
      rows per file, ~100x cheaper than argMax over the events (and than argMaxMerge over tuple
      states, which ClickHouse handles through its slow generic path).
    - `pipeline_state_store_mv`: materialized view on inserts into `task_events`; every new task
      version becomes a candidate row of its file.
    - `pipeline_state_pending_files`: files whose state needs a recompute because this run
      retracts something an insert-only view cannot: a deleted task, a task whose assigned_at
      moved backwards, a task moved to another file.

    The hooks of `task_events` drive it: `pipeline_state_record_retractions` (pre-hook) records
    the files before the old rows are deleted; `pipeline_state_sync` (post-hook) recomputes them
    from `task_events`, or rebuilds everything after a first build or a full refresh.
    Readers do not read the store: `int_pipeline_state_current` (a table rebuilt at each build)
    applies FINAL and the employee join once, and `pipeline_state` reads that table.
-#}

{% macro pipeline_state_relation(events_relation, suffix) -%}
    {{ return(events_relation.incorporate(path={"identifier": "pipeline_state_" ~ suffix}, type="table")) }}
{%- endmacro %}

{% macro pipeline_state_rank() -%}
    {#-
        (assigned_at, task_id, _version) as one UInt256, ordered like the tuple:
        bits 160+ milliseconds since 1900 (DateTime64's lower bound, so never negative),
        bits 64-159 the 12 bytes of the ObjectId (task_id is 24 lowercase hex digits, tested on
        stg_mongo__tasks, so numeric order equals string order), bits 0-63 the version.
    -#}
    bitOr(
        bitOr(
            bitShiftLeft(toUInt256(toUInt64(toUnixTimestamp64Milli(assigned_at) + 2208988800000)), 160),
            bitShiftLeft(toUInt256(reinterpretAsUInt128(reverse(unhex(task_id)))), 64)
        ),
        toUInt256(_version)
    )
{%- endmacro %}

{% macro pipeline_state_store_select(events_relation, pending_relation=none, reduce=true) -%}
    select
        file_id,
        {{ pipeline_state_rank() }} as rank,
        stage,
        employee_code,
        employee_name,
        status,
        assigned_at,
        task_id
    from {{ events_relation }}
    where
        is_deleted = 0
        {%- if pending_relation is not none %}
            and file_id in (select file_id from {{ pending_relation }})
        {%- endif %}
    {#- with reduce: one row per file up front, so a rebuild leaves no merging to the reads #}
    {%- if reduce %}
    order by file_id, rank desc
    limit 1 by file_id
    {%- endif %}
{%- endmacro %}

{% macro pipeline_state_create_pending(pending) -%}
    create table if not exists {{ pending }} (
        file_id String,
        rebuild_all UInt8,
        recorded_at DateTime64(3, 'UTC') default now64(3)
    )
    engine = MergeTree
    order by file_id
{%- endmacro %}

{% macro pipeline_state_record_retractions() %}
    {#- pre-hook of task_events; `this` is task_events -#}
    {% if not execute %}{{ return("") }}{% endif %}
    {% set pending = pipeline_state_relation(this, "pending_files") %}
    {% do run_query(pipeline_state_create_pending(pending)) %}
    {% if not is_incremental() %}
        {#- the table is (re)built from scratch and the view does not see that insert -#}
        {% do run_query("insert into " ~ pending ~ " (file_id, rebuild_all) values ('', 1)") %}
        {{ return("") }}
    {% endif %}
    {% set record %}
        insert into {{ pending }} (file_id, rebuild_all)
        select
            old.file_id,
            0
        from {{ this }} as old
        inner join (
            select
                task_id,
                file_id,
                assigned_at,
                is_deleted
            from {{ ref('stg_mongo__tasks') }}
            where task_id in ({{ task_events_changed_task_ids() }})
        ) as new on old.task_id = new.task_id
        where
            old.task_id in ({{ task_events_changed_task_ids() }})
            and old.is_deleted = 0
            and (
                new.is_deleted = 1
                or new.file_id != old.file_id
                or new.assigned_at < old.assigned_at
            )
    {% endset %}
    {% do run_query(record) %}
    {{ return("") }}
{% endmacro %}

{% macro pipeline_state_sync() %}
    {#- post-hook of task_events; `this` is task_events -#}
    {% if not execute %}{{ return("") }}{% endif %}
    {% set store = pipeline_state_relation(this, "store") %}
    {% set view = pipeline_state_relation(this, "store_mv") %}
    {% set pending = pipeline_state_relation(this, "pending_files") %}
    {% do run_query(pipeline_state_create_pending(pending)) %}

    {% set flags_row = run_query(
        "select countIf(rebuild_all = 1), countIf(rebuild_all = 0) from " ~ pending
    ).rows[0] %}
    {% set store_exists = adapter.get_relation(database=store.database, schema=store.schema, identifier=store.identifier) is not none %}
    {% set view_exists = adapter.get_relation(database=view.database, schema=view.schema, identifier=view.identifier) is not none %}

    {% if flags_row[0] > 0 or not store_exists or not view_exists %}
        {{ log("pipeline_state: rebuilding " ~ store ~ " from " ~ this, info=True) }}
        {% do run_query("drop view if exists " ~ view) %}
        {% do run_query("drop table if exists " ~ store) %}
        {% do run_query(
            "create table " ~ store ~ " engine = ReplacingMergeTree(rank) order by file_id empty as "
            ~ pipeline_state_store_select(this, reduce=false)
        ) %}
        {% do run_query(
            "create materialized view " ~ view ~ " to " ~ store ~ " as "
            ~ pipeline_state_store_select(this, reduce=false)
        ) %}
        {% do run_query("insert into " ~ store ~ " " ~ pipeline_state_store_select(this)) %}
    {% elif flags_row[1] > 0 %}
        {{ log("pipeline_state: recomputing " ~ flags_row[1] ~ " retracted file state(s)", info=True) }}
        {% do run_query(
            "delete from " ~ store ~ " where file_id in (select file_id from " ~ pending ~ ")"
        ) %}
        {% do run_query("insert into " ~ store ~ " " ~ pipeline_state_store_select(this, pending)) %}
    {% endif %}
    {% do run_query("truncate table " ~ pending) %}
    {{ return("") }}
{% endmacro %}
