{{ config(materialized='view') }}

{#-
    The naive reference for pipeline_state: argMax over the current version of every
    non-deleted task, recomputed from the raw tables on every read. It scans every task, so it
    exists for the tests and for debugging; dashboards read pipeline_state.
-#}

with

tasks as (

    select * from {{ ref('stg_mongo__tasks') }}
    where is_deleted = 0

),

recomputed as (

    select
        file_id,
        argMax(
            tuple(stage, employee_code, status, assigned_at, task_id),
            tuple(assigned_at, task_id)
        ) as current_task
    from tasks
    group by file_id

),

unpacked as (

    select
        file_id,
        tupleElement(current_task, 1) as stage,
        tupleElement(current_task, 2) as employee_code,
        tupleElement(current_task, 3) as status,
        tupleElement(current_task, 4) as assigned_at,
        tupleElement(current_task, 5) as task_id
    from recomputed

)

select * from unpacked
