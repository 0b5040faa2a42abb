{#-
    The current version of every employee document; deleted ones are kept and flagged
    (`is_deleted = 1`) so old tasks still resolve their assignee.
-#}

with

latest as (

    {{ latest_version_per_id(source('mongo', 'employee'), [
        'employee_code', 'employee_name', 'team', 'active', 'updated_at',
    ]) }}

),

renamed as (

    select
        _id as employee_id,
        _id_created_at as employee_created_at,
        employee_code,
        employee_name,
        toString(team) as team,
        toUInt8(active) as is_active,
        updated_at,
        {{ raw_bookkeeping_columns() }}
    from latest

)

select * from renamed
