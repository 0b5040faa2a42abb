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

    -- argMax by `_version` picks the newest version without FINAL; equal versions are
    -- re-loads of the same document version, identical apart from load bookkeeping.
    select
        _id,
        argMax(
            tuple(
                _id_created_at,
                file_id,
                stage,
                employee_code,
                employee_name,
                status,
                assigned_at,
                updated_at,
                is_deleted,
                _run_id
            ),
            _version
        ) as latest_row,
        max(_version) as latest_version,
        -- the last time any version was loaded: the incremental cursor downstream
        max(_loaded_at) as last_loaded_at
    from source
    group by _id

),

renamed as (

    select
        _id as task_id,
        tupleElement(latest_row, 1) as task_created_at,
        tupleElement(latest_row, 2) as file_id,
        toLowCardinality(tupleElement(latest_row, 3)) as stage,
        toLowCardinality(tupleElement(latest_row, 4)) as employee_code,
        tupleElement(latest_row, 5) as employee_name,
        toLowCardinality(tupleElement(latest_row, 6)) as status,
        tupleElement(latest_row, 7) as assigned_at,
        tupleElement(latest_row, 8) as updated_at,
        toUInt8(tupleElement(latest_row, 9)) as is_deleted,
        latest_version as _version,
        last_loaded_at as _loaded_at,
        tupleElement(latest_row, 10) as _run_id
    from latest

)

select * from renamed
