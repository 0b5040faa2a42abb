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

    {{ latest_version_per_id('source', [
        'file_id', 'stage', 'employee_code', 'employee_name', 'status', 'assigned_at', 'updated_at',
    ]) }}

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
