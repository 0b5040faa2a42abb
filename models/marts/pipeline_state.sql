{{ config(materialized='view') }}

{#-
    Current state per file, read from pipeline_state_store (kept by a materialized view on
    task_events, see macros/pipeline_state.sql): FINAL keeps the highest-ranked row of each
    file, so a read merges a few rows per file and never scans task_events. The assignee's name
    comes from dim_employees; the name copied into the task is only a fallback for a code the
    dimension does not know.
-#}

with

current_tasks as (

    select
        file_id,
        stage,
        employee_code,
        employee_name as task_employee_name,
        status,
        assigned_at,
        task_id
    from {{ pipeline_state_relation(ref('task_events'), 'store') }} final

),

employees as (

    select
        employee_code,
        employee_name
    from {{ ref('dim_employees') }}

),

joined as (

    select
        current_tasks.file_id,
        current_tasks.stage,
        {{ stage_order('current_tasks.stage') }} as stage_order,
        current_tasks.status,
        current_tasks.employee_code,
        if(
            employees.employee_code = current_tasks.employee_code,
            employees.employee_name,
            current_tasks.task_employee_name
        ) as employee_name,
        employees.employee_code = current_tasks.employee_code as is_known_employee,
        current_tasks.assigned_at,
        current_tasks.task_id,
        dateDiff('second', current_tasks.assigned_at, now64(3)) as time_in_stage_seconds
    from current_tasks
    left join employees on current_tasks.employee_code = employees.employee_code

)

select * from joined
