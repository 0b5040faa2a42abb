{{ config(materialized='view') }}

{#-
    The naive reference for pipeline_state: per file, the non-deleted task (current version)
    with the latest (assigned_at, task_id), recomputed from the raw tables on every read. It scans every task, so it
    exists for the tests and for debugging; dashboards read pipeline_state.
-#}

with

recomputed as (

    {{ latest_per_key(
        "(select * from " ~ ref('stg_mongo__tasks') ~ " where is_deleted = 0)",
        'file_id', 'tuple(assigned_at, task_id)',
        ['stage', 'employee_code', 'status', 'assigned_at', 'task_id'],
    ) }}

)

select * from recomputed
