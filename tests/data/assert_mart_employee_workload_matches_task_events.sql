{{ config(tags=['full_recompute'], enabled=var('full_recompute_tests', false)) }}

-- mart_employee_workload equals open files per assignee (and the oldest open assignment)
-- recomputed from task_events; idle employees show zero open tasks.

with

current_files as (

    {{ current_task_per_file(ref('task_events')) }}

),

expected as (

    select
        employee_code,
        count() as open_tasks,
        min(assigned_at) as oldest_open_assigned_at
    from current_files
    where {{ is_open_status('status') }}
    group by employee_code

),

actual as (

    select * from {{ ref('mart_employee_workload') }}
    where open_tasks > 0

)

{{ rows_differing(
    'expected', 'actual', ['employee_code', 'open_tasks', 'oldest_open_assigned_at']
) }}
