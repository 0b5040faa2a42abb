{#-
    The current version of every task document, deleted ones flagged (`is_deleted = 1`) rather
    than dropped, so facts downstream keep their history. Reading this view aggregates `raw.tasks`;
    a filter on `task_id` is pushed down to the primary key of the raw table, which is what keeps
    the incremental path of `task_events` proportional to the change.
-#}

with

source as (

    select * from {{ source('mongo', 'tasks') }}

),

latest as (

    -- One argMax per column (not one over a tuple), so a query that needs a few columns reads
    -- only those. Aliases differ from the source names: in ClickHouse an alias is visible in
    -- the whole SELECT and would shadow the column inside the other aggregates.
    -- Equal versions are re-loads of the same document version, identical but for bookkeeping.
    select
        _id,
        argMax(_id_created_at, _version) as latest_id_created_at,
        argMax(file_id, _version) as latest_file_id,
        argMax(stage, _version) as latest_stage,
        argMax(employee_code, _version) as latest_employee_code,
        argMax(employee_name, _version) as latest_employee_name,
        argMax(status, _version) as latest_status,
        argMax(assigned_at, _version) as latest_assigned_at,
        argMax(updated_at, _version) as latest_updated_at,
        argMax(is_deleted, _version) as latest_is_deleted,
        argMax(_run_id, _version) as latest_run_id,
        max(_version) as latest_version,
        -- the last time any version was loaded: the incremental cursor downstream
        max(_loaded_at) as last_loaded_at
    from source
    group by _id

),

renamed as (

    select
        _id as task_id,
        latest_id_created_at as task_created_at,
        latest_file_id as file_id,
        toLowCardinality(latest_stage) as stage,
        toLowCardinality(latest_employee_code) as employee_code,
        latest_employee_name as employee_name,
        toLowCardinality(latest_status) as status,
        latest_assigned_at as assigned_at,
        latest_updated_at as updated_at,
        toUInt8(latest_is_deleted) as is_deleted,
        latest_version as _version,
        last_loaded_at as _loaded_at,
        latest_run_id as _run_id
    from latest

)

select * from renamed
