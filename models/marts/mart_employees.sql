{#- on a cluster: a full copy on every server (every shard joins it), not sharded -#}
{{
    config(
        materialized='table',
        engine=cluster_engine('MergeTree()', shard='all'),
        order_by='employee_code',
    )
}}

{#-
    One row per employee_code. When several documents carry the same code, a live one wins
    over a deleted one, then the most recently updated; is_deleted = 1 only when every document
    of the code is deleted.
-#}

with

employees as (

    select * from {{ ref('stg_mongo__employees') }}

),

by_code as (

    {{ latest_per_key(
        'employees', 'employee_code', 'tuple(is_deleted = 0, updated_at, employee_id)',
        ['employee_id', 'employee_name', 'team', 'is_active', 'updated_at'],
        {'is_deleted': 'toUInt8(min(is_deleted))'},
    ) }}

)

select * from by_code
