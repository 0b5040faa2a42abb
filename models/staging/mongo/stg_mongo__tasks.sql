{#-
    The current version of every task document, deleted ones flagged (`is_deleted = 1`) rather
    than dropped, so facts downstream keep their history. Reading this view aggregates `raw.tasks`;
    a filter on `task_id` is pushed down to the primary key of the raw table, which is what keeps
    the incremental path of `task_events` proportional to the change.
-#}

with

latest as (

    {{ latest_version_per_id(source('mongo', 'tasks'), [
        'file_id', 'stage', 'employee_code', 'employee_name', 'status', 'assigned_at', 'updated_at',
    ]) }}

),

renamed as (

    select
        _id as task_id,
        _id_created_at as task_created_at,
        file_id,
        toLowCardinality(stage) as stage,
        toLowCardinality(employee_code) as employee_code,
        employee_name,
        toLowCardinality(status) as status,
        assigned_at,
        updated_at,
        {{ raw_bookkeeping_columns() }}
    from latest

)

select * from renamed
