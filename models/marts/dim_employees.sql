{{
    config(
        materialized='table',
        engine='MergeTree()',
        order_by='employee_code',
    )
}}

{#-
    One row per employee_code. When several documents carry the same code, a live one wins
    over a deleted one, then the most recently updated.
-#}

with

employees as (

    select * from {{ ref('stg_mongo__employees') }}

),

by_code as (

    select
        employee_code,
        argMax(
            tuple(employee_id, employee_name, team, is_active, updated_at),
            tuple(is_deleted = 0, updated_at, employee_id)
        ) as winner,
        min(is_deleted) as all_deleted
    from employees
    group by employee_code

),

unpacked as (

    select
        employee_code,
        tupleElement(winner, 1) as employee_id,
        tupleElement(winner, 2) as employee_name,
        tupleElement(winner, 3) as team,
        tupleElement(winner, 4) as is_active,
        tupleElement(winner, 5) as updated_at,
        toUInt8(all_deleted) as is_deleted
    from by_code

)

select * from unpacked
