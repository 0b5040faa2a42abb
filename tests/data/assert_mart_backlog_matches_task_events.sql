{{ config(tags=['full_recompute'], enabled=var('full_recompute_tests', false)) }}

-- mart_backlog_by_stage equals file counts per current stage and status recomputed from
-- task_events.

with

current_files as (

    {{ current_task_per_file(ref('task_events')) }}

),

expected as (

    select
        stage,
        status,
        count() as files,
        min(assigned_at) as oldest_assigned_at
    from current_files
    group by stage, status

),

actual as (

    select * from {{ ref('mart_backlog_by_stage') }}

)

{{ rows_differing('expected', 'actual', ['stage', 'status', 'files', 'oldest_assigned_at']) }}
