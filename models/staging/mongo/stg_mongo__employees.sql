{#-
    The current version of every employee document; deleted ones are kept and flagged
    (`is_deleted = 1`) so old tasks still resolve their assignee.
-#}

with

source as (

    select * from {{ source('mongo', 'employee') }}

),

latest as (

    {{ latest_version_per_id('source', [
        'employee_code', 'employee_name', 'team', 'active', 'updated_at',
    ]) }}

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
