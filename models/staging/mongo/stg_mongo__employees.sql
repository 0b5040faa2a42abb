{#-
    The current version of every employee document; deleted ones are kept and flagged
    (`is_deleted = 1`) so old tasks still resolve their assignee.
-#}

with

source as (

    select * from {{ source('mongo', 'employee') }}

),

latest as (

    -- One argMax per column (not one over a tuple), so a query that needs a few columns reads
    -- only those. Aliases differ from the source names: in ClickHouse an alias is visible in
    -- the whole SELECT and would shadow the column inside the other aggregates.
    -- Equal versions are re-loads of the same document version, identical but for bookkeeping.
    select
        _id,
        argMax(_id_created_at, _version) as latest_id_created_at,
        argMax(employee_code, _version) as latest_employee_code,
        argMax(employee_name, _version) as latest_employee_name,
        argMax(team, _version) as latest_team,
        argMax(active, _version) as latest_active,
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
        _id as employee_id,
        latest_id_created_at as employee_created_at,
        latest_employee_code as employee_code,
        latest_employee_name as employee_name,
        toString(latest_team) as team,
        toUInt8(latest_active) as is_active,
        latest_updated_at as updated_at,
        toUInt8(latest_is_deleted) as is_deleted,
        latest_version as _version,
        last_loaded_at as _loaded_at,
        latest_run_id as _run_id
    from latest

)

select * from renamed
