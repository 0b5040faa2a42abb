{#-
    The current version of every employee document; deleted ones are kept and flagged
    (`is_deleted = 1`) so old tasks still resolve their assignee.
-#}

with

source as (

    select * from {{ source('mongo', 'employee') }}

),

latest as (

    select
        _id,
        argMax(
            tuple(
                _id_created_at,
                employee_code,
                employee_name,
                team,
                active,
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
        _id as employee_id,
        tupleElement(latest_row, 1) as employee_created_at,
        tupleElement(latest_row, 2) as employee_code,
        tupleElement(latest_row, 3) as employee_name,
        toString(tupleElement(latest_row, 4)) as team,
        toUInt8(tupleElement(latest_row, 5)) as is_active,
        tupleElement(latest_row, 6) as updated_at,
        toUInt8(tupleElement(latest_row, 7)) as is_deleted,
        latest_version as _version,
        last_loaded_at as _loaded_at,
        tupleElement(latest_row, 8) as _run_id
    from latest

)

select * from renamed
