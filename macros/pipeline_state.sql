{#-
    The state behind `pipeline_state`, kept by ClickHouse as documents arrive rather than
    recomputed per read or per build (docs: `pipeline_state` in models/marts/_marts__docs.md):

    - `pipeline_state_store`: ReplacingMergeTree(rank) ORDER BY file_id. Every candidate current
      task of a file is a row; the engine keeps, per file, the row with the highest `rank`, which
      packs (assigned_at, task_id, _version) into one UInt256 (see pipeline_state_rank), so
      "latest assigned_at, ties broken by task_id" is exactly the order of the naive
      `argMax(..., (assigned_at, _id))`, and a newer version of the same task wins over its
      older versions when assigned_at is unchanged. Readers apply FINAL.
    - `pipeline_state_members`: every (file_id, task_id) pair a task version ever had,
      ORDER BY (file_id, task_id) with a projection by task_id: which tasks to recompute a file
      from, and which files may hold a task's candidates, both by primary key.
    - `pipeline_state_raw_mv`, `pipeline_state_members_mv`: materialized views on inserts into
      `raw.tasks` (the loader's table): every task version any loader writes (sync, reconcile,
      the change-stream follower) becomes a candidate row of its file in the same INSERT, with
      no dbt run in between.
    - Settling (what an insert-only view cannot express: a deleted task, assigned_at moved
      backwards, a task moved to another file, a version that arrived after a newer one): every
      file a changed task ever had a version in is recomputed from raw, and what differs is
      replaced (see pipeline_state_settle_files). A parameterized view holds the SQL
      the change-stream follower runs after each micro-batch (`loader/state.py`):
        `pipeline_state_recomputed(task_ids, file_ids)`: every file the given tasks ever had a
          version in and the given files (kind 'touched'), the current versions of their
          tasks from raw (kind 'current') and the rows the store holds for them (kind 'held').
      The hooks of `task_events` settle every file a task loaded since the last build touched
      (`pipeline_state_record_changed_tasks`, `pipeline_state_sync`), so whatever loaded a
      change, a build leaves the store equal to the recomputation.

    dbt knows these relations as the source `pipeline_state` (models/sources.yml: docs, and the
    singular tests in tests/data), and the readers as exposures. The hooks address them as
    derivatives of `this` (task_events), and every DDL carries `on_cluster()` (macros/
    cluster.sql): a profile with `cluster:` makes all of it ON CLUSTER. Every statement runs
    through dbt's `statement` (logged, named).

    On a cluster (macros/cluster.sql, docs/SCALING.md "The dbt side"): the store and members are
    Replicated local tables `<name>_local` under Distributed tables sharded by cityHash64(file_id)
    (a file's candidates on one shard, so FINAL and the settle are shard-local); the materialized
    views trigger on each server's `raw.tasks_local` (the table rows land in) and write TO the
    Distributed tables, which route each row to its file's shard; deletes and the EXCHANGE of a
    rebuilt store go to the local tables ON CLUSTER. The pending and scratch tables (a few ids)
    are replicated whole to every server, so every shard joins them locally.
-#}

{% macro pipeline_state_execute(name, sql, fetch=false) -%}
    {#- run one statement of the hooks through dbt's `statement`; the rows when `fetch` -#}
    {% call statement('pipeline_state: ' ~ name, fetch_result=fetch, auto_begin=false) -%}
        {{ sql }}
    {%- endcall %}
    {% if fetch %}
        {{ return(load_result('pipeline_state: ' ~ name).table.rows) }}
    {% endif %}
{%- endmacro %}

{% macro pipeline_state_ddl(verb, relation, rest='') -%}
    {#- `<verb> <relation> ON CLUSTER ... <rest>` (the clause is empty without a cluster) -#}
    {% do pipeline_state_execute(
        verb ~ " " ~ relation.identifier,
        verb ~ " " ~ relation ~ " " ~ on_cluster() ~ " " ~ rest
    ) %}
{%- endmacro %}

{% macro pipeline_state_relation(events_relation, suffix, type='table') -%}
    {#- `pipeline_state_<suffix>` next to task_events (`events_relation`), as its derivative -#}
    {{ return(events_relation.derivative(
        "pipeline_state_" ~ suffix, type, interpret_suffix_as_full_identifier=true
    )) }}
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

{% macro pipeline_state_members_select(raw_relation) -%}
    select
        file_id,
        _id as task_id
    from {{ raw_relation }}
{%- endmacro %}

{% macro pipeline_state_ranked(versions) -%}
    {#- `versions` (a relation or subquery of task versions named as staging names them), ranked -#}
    select
        task_id,
        file_id,
        {{ pipeline_state_rank() }} as rank,
        stage,
        employee_code,
        employee_name,
        status,
        assigned_at,
        is_deleted,
        _version
    from {{ versions }}
{%- endmacro %}

{% macro pipeline_state_current_versions(task_filter) -%}
    {#- the current version of the tasks matching `task_filter` (on task_id), with their rank -#}
    {{ pipeline_state_ranked(ref('stg_mongo__tasks')) }}
    where {{ task_filter }}
{%- endmacro %}

{% macro pipeline_state_latest_in_raw(id_filter) -%}
    {#-
        pipeline_state_current_versions for the follower's settle: the current version of each
        task matching `id_filter` (on _id) read straight from raw by its primary key
        (latest_row_per_id). The same rows as the staging view's aggregate, planned faster: at
        1M tasks the settle's query takes a quarter less CPU, most of which is planning, and
        the follower runs it after every micro-batch (loader/state.py).
    -#}
    {% set columns = [
        '_id as task_id', 'file_id', 'stage', 'employee_code', 'employee_name', 'status',
        'assigned_at', 'toUInt8(is_deleted) as is_deleted', '_version',
    ] %}
    {% set latest %}
        ({{ latest_row_per_id(source('mongo', 'tasks'), columns, id_filter) }})
    {% endset %}
    {{ pipeline_state_ranked(latest) }}
{%- endmacro %}

{% macro pipeline_state_superseded(held, current) -%}
    {#-
        Whether raw says the store row `held` is no longer a candidate: `current`, its task's
        current version (a left join on task_id), is at least as new as the row (the low 64
        bits of a rank are the version) and differs from it: deleted, in another file, or
        ranked otherwise. A row whose version raw does not show yet (an insert landing
        between the reads of raw and of the store, whichever came first) is not superseded, so
        a settle never deletes a candidate newer than what it recomputed from.
    -#}
    (
        {{ current }}.task_id != ''
        and {{ current }}._version >= toUInt64(bitAnd({{ held }}.rank, toUInt256('18446744073709551615')))
        and (
            {{ current }}.is_deleted = 1
            or {{ current }}.file_id != {{ held }}.file_id
            or {{ current }}.rank != {{ held }}.rank
        )
    )
{%- endmacro %}

{% macro pipeline_state_held_rows(store, members, files_sql) -%}
    {#-
        The rows the store holds for the files in `files_sql` (a subquery of file ids), each
        with `superseded` (pipeline_state_superseded) from its task's current version in raw
        (the tasks that ever had a version in those files: `members`, by primary key).
    -#}
    select
        h.file_id as file_id,
        h.rank as rank,
        h.task_id as task_id,
        {{ pipeline_state_superseded('h', 'c') }} as superseded
    from {{ store }} as h
    left join (
        {{ pipeline_state_current_versions(
            "task_id in (select task_id from " ~ members ~ " where file_id in " ~ files_sql ~ ")"
        ) }}
    ) as c on h.task_id = c.task_id
    where h.file_id in {{ files_sql }}
{%- endmacro %}

{% macro pipeline_state_best_of_files(members, files_sql) -%}
    {#-
        The best row of each file in `files_sql` (a subquery of file ids), from raw: the tasks
        that ever had a version in those files (`members`, by primary key), their current
        versions (primary-key lookups in raw), the live ones in those files, top rank per file.
    -#}
    {{ pipeline_state_best_rows(
        "task_id in (select task_id from " ~ members ~ " where file_id in " ~ files_sql ~ ")",
        "file_id in " ~ files_sql
    ) }}
{%- endmacro %}

{% macro pipeline_state_best_rows(task_filter, file_filter='1') -%}
    {#- the store columns of the top-ranked live current version per file (latest_per_key) -#}
    select {{ pipeline_state_store_columns() }}
    from (
        {{ latest_per_key(
            "(select * from (" ~ pipeline_state_current_versions(task_filter) ~ ")"
            ~ " where is_deleted = 0 and " ~ file_filter ~ ")",
            'file_id', 'rank',
            ['rank', 'stage', 'employee_code', 'employee_name', 'status', 'assigned_at', 'task_id'],
        ) }}
    )
{%- endmacro %}

{% macro pipeline_state_create_views(events_relation) -%}
    {#- The materialized views and the parameterized view (idempotent). -#}
    {% set store = pipeline_state_relation(events_relation, "store") %}
    {% set members = pipeline_state_relation(events_relation, "members") %}
    {% set raw = local_relation(source('mongo', 'tasks')) %}
    {#- the stale check of an earlier version: the follower now recomputes every touched file -#}
    {% do pipeline_state_ddl("drop view if exists", pipeline_state_relation(events_relation, "stale", "view")) %}
    {% do pipeline_state_ddl(
        "create materialized view if not exists",
        pipeline_state_relation(events_relation, "raw_mv", "materialized_view"),
        "to " ~ store ~ " as " ~ pipeline_state_raw_select(raw)
    ) %}
    {% do pipeline_state_ddl(
        "create materialized view if not exists",
        pipeline_state_relation(events_relation, "members_mv", "materialized_view"),
        "to " ~ members ~ " as " ~ pipeline_state_members_select(raw)
    ) %}
    {% set recomputed %}
        {#-
            One query; the caller chooses (loader/state.py, by the rules of
            pipeline_state_best_rows and pipeline_state_superseded, which a build's settle
            applies in SQL). Kind 'touched': every file the given tasks ever had a version in
            (members, through their by_task projection) and the given files; 'current': the
            current version of every task that ever had a version in those files, deleted
            ones included, with its rank and version; 'held': the rows the store holds for
            those files now.
        #}
        with touched as (
            select file_id from {{ members }} where task_id in {task_ids:Array(String)}
            union distinct
            select arrayJoin({file_ids:Array(String)}) as file_id
        )

        select
            'touched' as kind,
            file_id,
            toUInt256(0) as rank,
            '' as stage,
            '' as employee_code,
            '' as employee_name,
            '' as status,
            toDateTime64(0, 3, 'UTC') as assigned_at,
            '' as task_id,
            toUInt8(0) as is_deleted,
            toUInt64(0) as _version
        from touched
        where file_id != ''

        union all

        select
            'current' as kind,
            {{ pipeline_state_store_columns() }},
            is_deleted,
            _version
        from ({{ pipeline_state_latest_in_raw(
            "_id in (select task_id from " ~ members ~ " where file_id in (select file_id from touched))"
        ) }})

        union all

        select
            'held' as kind,
            file_id,
            rank,
            '' as stage,
            '' as employee_code,
            '' as employee_name,
            '' as status,
            toDateTime64(0, 3, 'UTC') as assigned_at,
            task_id,
            toUInt8(0) as is_deleted,
            toUInt64(0) as _version
        from {{ store }}
        where file_id in (select file_id from touched)
    {% endset %}
    {% do pipeline_state_ddl(
        "create or replace view", pipeline_state_relation(events_relation, "recomputed", "view"),
        "as " ~ recomputed
    ) %}
{%- endmacro %}

{% macro pipeline_state_create_store(relation) -%}
    {#- patch-part deletes (lightweight updates): a settle deletes a few rows cheaply -#}
    create table {{ relation }} {{ on_cluster() }}
    engine = {{ cluster_engine('ReplacingMergeTree(rank)') }}
    order by file_id
    settings
        {% if var('task_events_patch_deletes', true) -%}
        enable_block_number_column = 1,
        enable_block_offset_column = 1,
        {% endif -%}
        {#- small granules: the follower looks up a few files at random keys per batch -#}
        index_granularity = 1024
    empty as {{ pipeline_state_raw_select(source('mongo', 'tasks')) }}
{%- endmacro %}

{% macro pipeline_state_create_members(relation) -%}
    create table {{ relation }} {{ on_cluster() }} (
        file_id String,
        task_id String,
        projection by_task (select * order by task_id)
    )
    engine = {{ cluster_engine('ReplacingMergeTree') }}
    order by (file_id, task_id)
    settings deduplicate_merge_projection_mode = 'rebuild', index_granularity = 1024
{%- endmacro %}

{% macro pipeline_state_create_pending(pending) -%}
    create table if not exists {{ pending }} {{ on_cluster() }} (
        task_id String,
        file_id String,
        rebuild_all UInt8,
        recorded_at DateTime64(3, 'UTC') default now64(3)
    )
    engine = {{ cluster_engine('MergeTree', shard='all') }}
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
    {% do pipeline_state_execute("create pending", pipeline_state_create_pending(pending)) %}
    {% if not is_incremental() %}
        {#- task_events is (re)built from scratch: so is the store -#}
        {% set rebuild_all %}
            insert into {{ pending }} (task_id, file_id, rebuild_all) values ('', '', 1)
        {% endset %}
        {% do pipeline_state_execute("record a rebuild", rebuild_all) %}
        {{ return("") }}
    {% endif %}
    {% set changed_tasks %}
        insert into {{ pending }} (task_id, file_id, rebuild_all)
        select
            _id,
            '',
            0
        from ({{ task_events_changed_task_ids() }})
    {% endset %}
    {% do pipeline_state_execute("record changed tasks", changed_tasks) %}
    {% set their_files %}
        insert into {{ pending }} (task_id, file_id, rebuild_all)
        select
            '',
            file_id,
            0
        from {{ this }}
        where task_id in (select task_id from {{ pending }} where task_id != '')
    {% endset %}
    {% do pipeline_state_execute("record their files", their_files) %}
    {{ return("") }}
{% endmacro %}

{% macro pipeline_state_insert_best(store, best, diff, diff_filter="1") -%}
    {#- insert the best rows of the differing files (`diff` rows matching `diff_filter`) again:
        the inserts repeat rows on purpose, so no block deduplication -#}
    insert into {{ store }}
    select {{ pipeline_state_store_columns() }}
    from {{ best }}
    where (file_id, rank) in (select file_id, best_rank from {{ diff }} where {{ diff_filter }})
    settings insert_deduplicate = 0
{%- endmacro %}

{% macro pipeline_state_settle_files(store, members, files, round=1) %}
    {#-
        Make the store's row of every file in the table `files` (file_id) the best row
        recomputed from raw: insert the best rows of the files whose state differs, then delete
        their rows that outrank the best and that raw supersedes (all of them for a file left
        without live tasks; a row newer than the recomputation stays), then insert the best
        rows of the files that lost a row once more. ReplacingMergeTree keeps each file's top
        row when it merges, and a merge that began before the delete (it may end at any time
        after it) keeps the stale row, which the delete hides, and drops the best one; a row
        inserted after the delete is in a part no such merge reads.
        loader/state.py `settle_files` does the same for the change-stream follower.

        A load may land while this runs (the follower does not wait for builds): a best row
        recomputed before a retraction was stored, and inserted after the follower settled
        it, would show a deleted or moved task until the next build. So the files whose shown
        row raw supersedes at the end are settled again (three rounds at most).
    -#}
    {% set best = pipeline_state_relation(store, "settle_best") %}
    {% set diff = pipeline_state_relation(store, "settle_diff") %}
    {% set doomed = pipeline_state_relation(store, "settle_doomed") %}
    {% set again = pipeline_state_relation(store, "settle_again_" ~ round) %}
    {% do pipeline_state_ddl("drop table if exists", best) %}
    {% do pipeline_state_ddl("drop table if exists", diff) %}
    {% set files_sql = "(select file_id from " ~ files ~ ")" %}
    {% do pipeline_state_scratch(best, pipeline_state_best_of_files(members, files_sql)) %}
    {#- tests only: statements that land a load here, between the recomputation and its insert -#}
    {% for sql in var('pipeline_state_test_after_recompute', []) if round == 1 %}
        {% do pipeline_state_execute("test: after recompute", sql) %}
    {% endfor %}
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
    {% do pipeline_state_scratch(diff, differing) %}
    {% set n = pipeline_state_execute("count differing files", "select count() from " ~ diff, fetch=true)[0][0] %}
    {% if n > 0 %}
        {{ log("pipeline_state: settling " ~ n ~ " file state(s)", info=True) }}
        {% do pipeline_state_execute("insert best rows", pipeline_state_insert_best(store, best, diff)) %}
        {#-
            the rows that outrank the best and that raw supersedes, read after the insert: a
            row a load added since the best rows were computed is newer than them, and stays
        #}
        {% set outranking %}
            select
                h.file_id as file_id,
                h.rank as rank
            from ({{ pipeline_state_held_rows(store, members, "(select file_id from " ~ diff ~ ")") }}) as h
            inner join {{ diff }} as d on h.file_id = d.file_id
            where h.superseded and h.rank > d.best_rank
        {% endset %}
        {% do pipeline_state_ddl("drop table if exists", doomed) %}
        {% do pipeline_state_scratch(doomed, outranking) %}
        {% set delete_outranking %}
            where (file_id, rank) in (select file_id, rank from {{ doomed }})
            {% if var('task_events_patch_deletes', true) -%}
                settings lightweight_delete_mode = 'lightweight_update'
            {%- endif %}
        {% endset %}
        {% do pipeline_state_ddl("delete from", local_relation(store), delete_outranking) %}
        {#- tests only: statements that drop a best row here, as such a merge does -#}
        {% for sql in var('pipeline_state_test_after_delete', []) if round == 1 %}
            {% do pipeline_state_execute("test: after delete", sql) %}
        {% endfor %}
        {#- only a file with a row deleted can lose its best row so (as in loader/state.py) -#}
        {% set lost = "file_id in (select file_id from " ~ doomed ~ ")" %}
        {% do pipeline_state_execute("insert best rows after the delete", pipeline_state_insert_best(store, best, diff, lost)) %}
        {% if round < 3 %}
            {% set superseded_now %}
                select file_id
                from ({{ pipeline_state_held_rows(store, members, "(select file_id from " ~ diff ~ ")") }})
                group by file_id
                having argMax(superseded, rank) = 1
            {% endset %}
            {% do pipeline_state_ddl("drop table if exists", again) %}
            {% do pipeline_state_scratch(again, superseded_now) %}
            {% set left = pipeline_state_execute("count superseded rows shown", "select count() from " ~ again, fetch=true)[0][0] %}
            {% if left > 0 %}
                {{ log("pipeline_state: " ~ left ~ " file state(s) superseded by loads meanwhile, settling again", info=True) }}
                {% do pipeline_state_settle_files(store, members, again, round + 1) %}
            {% endif %}
            {% do pipeline_state_ddl("drop table if exists", again) %}
        {% endif %}
    {% endif %}
    {% do pipeline_state_ddl("drop table if exists", best) %}
    {% do pipeline_state_ddl("drop table if exists", diff) %}
    {% do pipeline_state_ddl("drop table if exists", doomed) %}
{% endmacro %}

{% macro pipeline_state_swap_in(target, create_macro, view, view_select, copy_select, aside) %}
    {#-
        (Re)build `target` from `copy_select` while `view` keeps feeding it from raw.
        With `aside` (the target and its view exist): build a copy next to it, fed by a view of
        its own created before the copy (so a load meanwhile reaches it one way or both), then
        swap the two tables atomically, so readers keep the old table until the new one is
        complete. Views address their target by name: after the swap `view` feeds the new table.
        Without: drop the view first (an insert into raw must never meet a view without its
        table), create the table and the view, then copy.
    -#}
    {% if aside %}
        {% set next = target.derivative("_next") %}
        {% set next_view = target.derivative("_next_mv", "materialized_view") %}
        {% do pipeline_state_ddl("drop view if exists", next_view) %}
        {% do pipeline_state_drop_sharded("drop table if exists", next) %}
        {% do pipeline_state_create_sharded(next, create_macro) %}
        {% do pipeline_state_ddl("create materialized view", next_view, "to " ~ next ~ " as " ~ view_select) %}
        {% do pipeline_state_execute("fill " ~ next.identifier, "insert into " ~ next ~ " " ~ copy_select) %}
        {% do pipeline_state_execute(
            "exchange " ~ next.identifier,
            "exchange tables " ~ local_relation(next) ~ " and " ~ local_relation(target) ~ " " ~ on_cluster()
        ) %}
        {% do pipeline_state_ddl("drop view", next_view) %}
        {% do pipeline_state_drop_sharded("drop table", next) %}
    {% else %}
        {% do pipeline_state_ddl("drop view if exists", view) %}
        {% do pipeline_state_drop_sharded("drop table if exists", target) %}
        {% do pipeline_state_create_sharded(target, create_macro) %}
        {% do pipeline_state_ddl("create materialized view", view, "to " ~ target ~ " as " ~ view_select) %}
        {% do pipeline_state_execute("fill " ~ target.identifier, "insert into " ~ target ~ " " ~ copy_select) %}
    {% endif %}
{% endmacro %}

{% macro pipeline_state_create_sharded(relation, create_macro) -%}
    {#- `relation` by `create_macro`; on a cluster, its local table and a Distributed `relation` -#}
    {% set local = local_relation(relation) %}
    {% do pipeline_state_execute("create " ~ local.identifier, create_macro(local)) %}
    {% if is_clustered() %}
        {% do pipeline_state_ddl(
            "create table", relation, "as " ~ local ~ " ENGINE = " ~ distributed_engine(local, 'cityHash64(file_id)')
        ) %}
    {% endif %}
{%- endmacro %}

{% macro pipeline_state_drop_sharded(verb, relation) -%}
    {#- drop `relation`; on a cluster, its local table first, then the Distributed one -#}
    {% if is_clustered() %}
        {% do pipeline_state_ddl(verb, local_relation(relation)) %}
        {% do pipeline_state_ddl("drop table if exists", relation) %}
    {% else %}
        {% do pipeline_state_ddl(verb, relation) %}
    {% endif %}
{%- endmacro %}

{% macro pipeline_state_scratch(relation, select_sql) -%}
    {#-
        A scratch table of the settle (a few file ids or rows) filled by `select_sql`. On a
        cluster: replicated whole to every server (so every shard joins it locally), created
        empty ON CLUSTER, then filled once (a CREATE ... AS SELECT ON CLUSTER would fill it on
        every server).
    -#}
    {% if not is_clustered() %}
        {% do pipeline_state_ddl("create table", relation, "engine = MergeTree order by file_id as " ~ select_sql) %}
    {% else %}
        {% do pipeline_state_ddl(
            "create table", relation,
            "engine = " ~ cluster_engine('MergeTree', shard='all') ~ " order by file_id empty as " ~ select_sql
        ) %}
        {% do pipeline_state_execute("fill " ~ relation.identifier, "insert into " ~ relation ~ " " ~ select_sql) %}
    {% endif %}
{%- endmacro %}

{% macro pipeline_state_exists(relation) -%}
    {{ return(adapter.get_relation(database=relation.database, schema=relation.schema, identifier=relation.identifier) is not none) }}
{%- endmacro %}

{% macro pipeline_state_sync() %}
    {#- post-hook of task_events; `this` is task_events -#}
    {% if not execute %}{{ return("") }}{% endif %}
    {% set raw = source('mongo', 'tasks') %}
    {% set store = pipeline_state_relation(this, "store") %}
    {% set raw_mv = pipeline_state_relation(this, "raw_mv", "materialized_view") %}
    {% set members = pipeline_state_relation(this, "members") %}
    {% set members_mv = pipeline_state_relation(this, "members_mv", "materialized_view") %}
    {% set pending = pipeline_state_relation(this, "pending") %}
    {% set touched = pipeline_state_relation(this, "settle_files") %}
    {% do pipeline_state_execute("create pending", pipeline_state_create_pending(pending)) %}
    {#- the objects of the earlier design (a view on task_events, pending files) -#}
    {% set legacy_view = pipeline_state_relation(this, "store_mv", "materialized_view") %}
    {% set legacy = pipeline_state_exists(legacy_view) %}
    {% do pipeline_state_ddl("drop view if exists", legacy_view) %}
    {% do pipeline_state_ddl("drop table if exists", pipeline_state_relation(this, "pending_files")) %}

    {% set flags_row = pipeline_state_execute(
        "read pending",
        "select countIf(rebuild_all = 1), countIf(rebuild_all = 0) from " ~ pending,
        fetch=true
    )[0] %}
    {% set store_ok = pipeline_state_exists(store) and pipeline_state_exists(raw_mv) and not legacy %}
    {% set members_ok = pipeline_state_exists(members) and pipeline_state_exists(members_mv) %}

    {% if flags_row[0] > 0 or not store_ok or not members_ok %}
        {{ log("pipeline_state: rebuilding " ~ store ~ " from " ~ raw, info=True) }}
        {% do pipeline_state_swap_in(
            members, pipeline_state_create_members, members_mv, pipeline_state_members_select(local_relation(raw)),
            "select distinct file_id, _id as task_id from " ~ raw, members_ok
        ) %}
        {% do pipeline_state_swap_in(
            store, pipeline_state_create_store, raw_mv, pipeline_state_raw_select(local_relation(raw)),
            pipeline_state_best_rows("1"), store_ok
        ) %}
        {% do pipeline_state_create_views(this) %}
    {% else %}
        {% do pipeline_state_create_views(this) %}
        {% if flags_row[1] > 0 %}
            {#-
                Every file a task loaded since the last build was in (task_events, before this
                run) or had a version in (members): whatever the hot path did or missed, these
                files end equal to the recomputation.
            -#}
            {% set changed = "(select task_id from " ~ pending ~ " where task_id != '')" %}
            {% do pipeline_state_ddl("drop table if exists", touched) %}
            {% set touched_files %}
                select distinct file_id
                from (
                    select file_id from {{ pending }} where file_id != ''
                    union all
                    select file_id from {{ members }} where task_id in {{ changed }}
                )
            {% endset %}
            {% do pipeline_state_scratch(touched, touched_files) %}
            {% do pipeline_state_settle_files(store, members, touched) %}
            {% do pipeline_state_ddl("drop table if exists", touched) %}
        {% endif %}
    {% endif %}
    {% do pipeline_state_ddl("truncate table", pending) %}
    {{ return("") }}
{% endmacro %}
