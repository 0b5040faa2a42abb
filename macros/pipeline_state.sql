{#-
    The state behind `pipeline_state`, kept by ClickHouse as documents arrive rather than
    recomputed per read or per build (docs: `pipeline_state` in models/marts/_marts__docs.md):

    - `pipeline_state_store`: ReplacingMergeTree(rank) ORDER BY file_id. Every candidate current
      task of a file is a row; the engine keeps, per file, the row with the highest `rank`, which
      packs (assigned_at, task_id, _version) into one UInt256 (see pipeline_state_rank), so
      "latest assigned_at, ties broken by task_id" is exactly the order of the naive
      `argMax(..., (assigned_at, _id))`, and a newer version of the same task wins over its
      older versions when assigned_at is unchanged. Readers apply FINAL.
    - `pipeline_state_raw_mv`: materialized view on inserts into `raw.tasks` (the loader's
      table): every task version any loader writes (sync, reconcile, the change-stream follower)
      becomes a candidate row of its file in the same INSERT, with no dbt run in between.
    - Settling (what an insert-only view cannot express: a deleted task, assigned_at moved
      backwards, a task moved to another file, a version that arrived after a newer one): the
      store rows of the changed tasks that disagree with the task's current version are
      "stale"; their files are recomputed from raw, the recomputed best row inserted, then the
      stale rows deleted (in that order, so a reader never sees a file without a row). Two
      parameterized views hold the SQL, so every caller runs the same definition:
        `pipeline_state_stale(task_ids, file_ids, assigned_ms, versions, deleted)`: stale rows
          of the given task versions, plus (task_id '') files whose best row ranks below a live
          given version (a candidate the view did not deliver);
        `pipeline_state_recomputed(file_ids)`: the best row of each file, from raw.
      The change-stream follower settles each micro-batch right after storing it
      (`loader/state.py`); the hooks of `task_events` settle every task loaded since the last
      build (`pipeline_state_record_changed_tasks`, `pipeline_state_sync`), so whatever loaded
      a change, a build leaves the store equal to the recomputation.
-#}

{% macro pipeline_state_relation(events_relation, suffix) -%}
    {{ return(events_relation.incorporate(path={"identifier": "pipeline_state_" ~ suffix}, type="table")) }}
{%- endmacro %}

{% macro pipeline_state_rank(task_id='task_id', version='_version', assigned_at='assigned_at') -%}
    {#-
        (assigned_at, task_id, _version) as one UInt256, ordered like the tuple:
        bits 160+ milliseconds since 1900 (DateTime64's lower bound, so never negative),
        bits 64-159 the 12 bytes of the ObjectId (task_id is 24 lowercase hex digits, tested on
        stg_mongo__tasks, so numeric order equals string order), bits 0-63 the version.
    -#}
    bitOr(
        bitOr(
            bitShiftLeft(toUInt256(toUInt64(toUnixTimestamp64Milli({{ assigned_at }}) + 2208988800000)), 160),
            bitShiftLeft(toUInt256(reinterpretAsUInt128(reverse(unhex({{ task_id }})))), 64)
        ),
        toUInt256({{ version }})
    )
{%- endmacro %}

{% macro pipeline_state_store_columns() -%}
    file_id, rank, stage, employee_code, employee_name, status, assigned_at, task_id
{%- endmacro %}

{% macro pipeline_state_raw_select(raw_relation) -%}
    {#- every live row inserted into raw.tasks as a candidate (the materialized view) -#}
    select
        file_id,
        {{ pipeline_state_rank(task_id='_id') }} as rank,
        stage,
        employee_code,
        employee_name,
        status,
        assigned_at,
        _id as task_id
    from {{ raw_relation }}
    where is_deleted = 0
{%- endmacro %}

{% macro pipeline_state_current_versions(task_filter) -%}
    {#- the current version of the tasks matching `task_filter` (on task_id), with their rank -#}
    select
        task_id,
        file_id,
        {{ pipeline_state_rank() }} as rank,
        stage,
        employee_code,
        employee_name,
        status,
        assigned_at,
        is_deleted
    from {{ ref('stg_mongo__tasks') }}
    where {{ task_filter }}
{%- endmacro %}

{% macro pipeline_state_best_of_files(files_sql) -%}
    {#-
        The best row of each file in `files_sql` (a subquery of file ids), from raw: the tasks
        that ever had a version in those files (a scan of raw.tasks' file_id column), then their
        current versions (primary-key lookups), live ones in those files, top rank per file.
    -#}
    select {{ pipeline_state_store_columns() }}
    from (
        {{ pipeline_state_current_versions(
            "task_id in (select _id from " ~ source('mongo', 'tasks') ~ " where file_id in " ~ files_sql ~ ")"
        ) }}
    )
    where is_deleted = 0 and file_id in {{ files_sql }}
    order by file_id, rank desc
    limit 1 by file_id
{%- endmacro %}

{% macro pipeline_state_stale_select(store, latest, task_ids_sql) -%}
    {#-
        `latest`: a CTE name with (task_id, file_id, rank, is_deleted) of the current version of
        some tasks, whose ids `task_ids_sql` (a subquery) also lists (so the store's scan of
        task_id can skip granules). Returns (file_id, task_id, rank) of every store row of those
        tasks that the current version contradicts, and (file_id, '', 0) for every file whose
        best row ranks below a live current version (a candidate the view never delivered, or
        one a concurrent settle deleted).
    -#}
    select
        s.file_id as file_id,
        s.task_id as task_id,
        s.rank as rank
    from {{ store }} as s
    inner join {{ latest }} as l on s.task_id = l.task_id
    where
        s.task_id in {{ task_ids_sql }}
        and (l.is_deleted = 1 or s.file_id != l.file_id or s.rank > l.rank)

    union all

    select
        l.file_id as file_id,
        '' as task_id,
        toUInt256(0) as rank
    from {{ latest }} as l
    left join (
        select
            file_id,
            max(rank) as best
        from {{ store }}
        where file_id in (select file_id from {{ latest }} where is_deleted = 0)
        group by file_id
    ) as b on l.file_id = b.file_id
    where l.is_deleted = 0 and b.best < l.rank
    settings join_use_nulls = 0
{%- endmacro %}

{% macro pipeline_state_create_views(events_relation) -%}
    {#- The materialized view and the two parameterized views (idempotent). -#}
    {% set store = pipeline_state_relation(events_relation, "store") %}
    {% set raw_mv = pipeline_state_relation(events_relation, "raw_mv") %}
    {% set stale = pipeline_state_relation(events_relation, "stale") %}
    {% set recomputed = pipeline_state_relation(events_relation, "recomputed") %}
    {% do run_query(
        "create materialized view if not exists " ~ raw_mv ~ " to " ~ store ~ " as "
        ~ pipeline_state_raw_select(source('mongo', 'tasks'))
    ) %}
    {% set latest_from_params %}
        select
            task_id,
            file_id,
            {{ pipeline_state_rank(assigned_at="fromUnixTimestamp64Milli(assigned_ms, 'UTC')") }} as rank,
            is_deleted
        from (
            select
                tupleElement(v, 1) as task_id,
                tupleElement(v, 2) as file_id,
                tupleElement(v, 3) as assigned_ms,
                tupleElement(v, 4) as _version,
                tupleElement(v, 5) as is_deleted
            from (
                select arrayJoin(arrayZip(
                    {task_ids:Array(String)},
                    {file_ids:Array(String)},
                    {assigned_ms:Array(Int64)},
                    {versions:Array(UInt64)},
                    {deleted:Array(UInt8)}
                )) as v
            )
        )
    {% endset %}
    {% do run_query(
        "create or replace view " ~ stale ~ " as with latest as (" ~ latest_from_params ~ ") "
        ~ pipeline_state_stale_select(store, "latest", "{task_ids:Array(String)}")
    ) %}
    {% do run_query(
        "create or replace view " ~ recomputed ~ " as "
        ~ pipeline_state_best_of_files("{file_ids:Array(String)}")
    ) %}
{%- endmacro %}

{% macro pipeline_state_create_store(relation) -%}
    {#- patch-part deletes (lightweight updates): a settle deletes a few rows cheaply -#}
    create table {{ relation }}
    engine = ReplacingMergeTree(rank)
    order by file_id
    settings enable_block_number_column = 1, enable_block_offset_column = 1
    empty as {{ pipeline_state_raw_select(source('mongo', 'tasks')) }}
{%- endmacro %}

{% macro pipeline_state_create_pending(pending) -%}
    create table if not exists {{ pending }} (
        task_id String,
        file_id String,
        rebuild_all UInt8,
        recorded_at DateTime64(3, 'UTC') default now64(3)
    )
    engine = MergeTree
    order by (task_id, file_id)
{%- endmacro %}

{% macro pipeline_state_record_changed_tasks() %}
    {#-
        pre-hook of task_events (`this`): the tasks loaded since the last build, and the files
        task_events still puts them in, recorded before the incremental run moves its cursor
        past them, for the post-hook to settle. Kept until a post-hook has settled them, so a
        failed run leaves them for the next one.
    -#}
    {% if not execute %}{{ return("") }}{% endif %}
    {% set pending = pipeline_state_relation(this, "pending") %}
    {% do run_query(pipeline_state_create_pending(pending)) %}
    {% if not is_incremental() %}
        {#- task_events is (re)built from scratch: so is the store -#}
        {% do run_query("insert into " ~ pending ~ " (task_id, file_id, rebuild_all) values ('', '', 1)") %}
        {{ return("") }}
    {% endif %}
    {% do run_query(
        "insert into " ~ pending ~ " (task_id, file_id, rebuild_all) select _id, '', 0 from ("
        ~ task_events_changed_task_ids() ~ ")"
    ) %}
    {% do run_query(
        "insert into " ~ pending ~ " (task_id, file_id, rebuild_all) select '', file_id, 0 from "
        ~ this ~ " where task_id in (select task_id from " ~ pending ~ " where task_id != '')"
    ) %}
    {{ return("") }}
{% endmacro %}

{% macro pipeline_state_settle_files(store, files) %}
    {#-
        Make the store's row of every file in the table `files` (file_id) the best row
        recomputed from raw: insert the best rows of the files whose state differs, then delete
        their rows that outrank the best (all of them for a file left without live tasks), then
        insert again any best row a merge dropped meanwhile (ReplacingMergeTree keeps the top
        row when it merges, which may still be the stale one until the delete lands).
    -#}
    {% set best = pipeline_state_relation(store, "settle_best") %}
    {% set diff = pipeline_state_relation(store, "settle_diff") %}
    {% do run_query("drop table if exists " ~ best) %}
    {% do run_query("drop table if exists " ~ diff) %}
    {% set files_sql = "(select file_id from " ~ files ~ ")" %}
    {% do run_query(
        "create table " ~ best ~ " engine = MergeTree order by file_id as "
        ~ pipeline_state_best_of_files(files_sql)
    ) %}
    {% set differing %}
        select
            f.file_id as file_id,
            b.rank as best_rank
        from {{ files }} as f
        left join {{ best }} as b on f.file_id = b.file_id
        left join (
            select
                file_id,
                rank
            from {{ store }} final
            where file_id in {{ files_sql }}
        ) as s on f.file_id = s.file_id
        where s.rank != b.rank
        settings join_use_nulls = 0
    {% endset %}
    {% do run_query("create table " ~ diff ~ " engine = MergeTree order by file_id as " ~ differing) %}
    {% set n = run_query("select count() from " ~ diff).rows[0][0] %}
    {% if n > 0 %}
        {{ log("pipeline_state: settling " ~ n ~ " file state(s)", info=True) }}
        {% set insert_best %}
            insert into {{ store }}
            select {{ pipeline_state_store_columns() }}
            from {{ best }}
            where (file_id, rank) in (select file_id, best_rank from {{ diff }})
        {% endset %}
        {% do run_query(insert_best) %}
        {% do run_query(
            "delete from " ~ store ~ " where (file_id, rank) in (select s.file_id, s.rank from "
            ~ store ~ " as s inner join " ~ diff ~ " as d on s.file_id = d.file_id"
            ~ " where s.file_id in (select file_id from " ~ diff ~ ") and s.rank > d.best_rank)"
            ~ " settings lightweight_delete_mode = 'lightweight_update'"
        ) %}
        {% set dropped %}
            select count()
            from {{ diff }} as d
            left join (
                select
                    file_id,
                    rank
                from {{ store }} final
                where file_id in (select file_id from {{ diff }})
            ) as s on d.file_id = s.file_id
            where d.best_rank != 0 and s.rank != d.best_rank
            settings join_use_nulls = 0
        {% endset %}
        {% for attempt in range(3) %}
            {% if run_query(dropped).rows[0][0] > 0 %}
                {% do run_query(insert_best) %}
            {% endif %}
        {% endfor %}
    {% endif %}
    {% do run_query("drop table if exists " ~ best) %}
    {% do run_query("drop table if exists " ~ diff) %}
{% endmacro %}

{% macro pipeline_state_sync() %}
    {#- post-hook of task_events; `this` is task_events -#}
    {% if not execute %}{{ return("") }}{% endif %}
    {% set store = pipeline_state_relation(this, "store") %}
    {% set raw_mv = pipeline_state_relation(this, "raw_mv") %}
    {% set pending = pipeline_state_relation(this, "pending") %}
    {% set touched = pipeline_state_relation(this, "settle_files") %}
    {% do run_query(pipeline_state_create_pending(pending)) %}
    {#- the objects of the earlier design (a view on task_events, pending files) -#}
    {% set legacy_mv = pipeline_state_relation(this, "store_mv") %}
    {% set legacy_mv_exists = adapter.get_relation(database=legacy_mv.database, schema=legacy_mv.schema, identifier=legacy_mv.identifier) is not none %}
    {% do run_query("drop view if exists " ~ legacy_mv) %}
    {% do run_query("drop table if exists " ~ pipeline_state_relation(this, "pending_files")) %}

    {% set flags_row = run_query(
        "select countIf(rebuild_all = 1), countIf(rebuild_all = 0) from " ~ pending
    ).rows[0] %}
    {% set store_exists = adapter.get_relation(database=store.database, schema=store.schema, identifier=store.identifier) is not none %}
    {% set view_exists = adapter.get_relation(database=raw_mv.database, schema=raw_mv.schema, identifier=raw_mv.identifier) is not none %}

    {% if flags_row[0] > 0 or legacy_mv_exists or not store_exists or not view_exists %}
        {{ log("pipeline_state: rebuilding " ~ store ~ " from " ~ source('mongo', 'tasks'), info=True) }}
        {% set copy_all %}
            select {{ pipeline_state_store_columns() }}
            from ({{ pipeline_state_current_versions("1") }})
            where is_deleted = 0
            order by file_id, rank desc
            limit 1 by file_id
        {% endset %}
        {% if store_exists and view_exists and not legacy_mv_exists %}
            {#-
                Readers keep the old store until the new one is complete: build it aside, fed
                by a view of its own from before the copy (so a load meanwhile reaches it one
                way or both), then swap the two tables atomically. Views address their target
                by name, so after the swap the store's view feeds the new table.
            -#}
            {% set next = pipeline_state_relation(this, "store_next") %}
            {% set next_mv = pipeline_state_relation(this, "store_next_mv") %}
            {% do run_query("drop view if exists " ~ next_mv) %}
            {% do run_query("drop table if exists " ~ next) %}
            {% do run_query(pipeline_state_create_store(next)) %}
            {% do run_query(
                "create materialized view " ~ next_mv ~ " to " ~ next ~ " as "
                ~ pipeline_state_raw_select(source('mongo', 'tasks'))
            ) %}
            {% do run_query("insert into " ~ next ~ " " ~ copy_all) %}
            {% do run_query("exchange tables " ~ next ~ " and " ~ store) %}
            {% do run_query("drop view " ~ next_mv) %}
            {% do run_query("drop table " ~ next) %}
            {% do pipeline_state_create_views(this) %}
        {% else %}
            {#- the view first: an insert into raw must never meet a view without its table -#}
            {% do run_query("drop view if exists " ~ raw_mv) %}
            {% do run_query("drop table if exists " ~ store) %}
            {% do run_query(pipeline_state_create_store(store)) %}
            {#- the view before the copy: a load meanwhile reaches the store one way or both -#}
            {% do pipeline_state_create_views(this) %}
            {% do run_query("insert into " ~ store ~ " " ~ copy_all) %}
        {% endif %}
    {% else %}
        {% do pipeline_state_create_views(this) %}
        {% if flags_row[1] > 0 %}
            {#-
                Every file a task loaded since the last build was in, is in, or has a candidate
                row in: whatever the hot path did or missed, these files end equal to the
                recomputation.
            -#}
            {% set changed = "(select task_id from " ~ pending ~ " where task_id != '')" %}
            {% do run_query("drop table if exists " ~ touched) %}
            {% set touched_files %}
                select distinct file_id
                from (
                    select file_id from {{ pending }} where file_id != ''
                    union all
                    select file_id from {{ store }} where task_id in {{ changed }}
                    union all
                    select file_id from {{ ref('stg_mongo__tasks') }} where task_id in {{ changed }}
                )
            {% endset %}
            {% do run_query("create table " ~ touched ~ " engine = MergeTree order by file_id as " ~ touched_files) %}
            {% do pipeline_state_settle_files(store, touched) %}
            {% do run_query("drop table if exists " ~ touched) %}
        {% endif %}
    {% endif %}
    {% do run_query("truncate table " ~ pending) %}
    {{ return("") }}
{% endmacro %}
