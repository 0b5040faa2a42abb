{{ config(materialized='view') }}

{#-
    Open work per employee: int_employee_workload (one row per employee, rebuilt at each build)
    plus the age of the oldest open task, computed at read time so it stays current between
    builds.
-#}

with

workload as (

    select * from {{ ref('int_employee_workload') }}

),

aged as (

    select
        employee_code,
        employee_name,
        team,
        is_active,
        is_deleted,
        is_known_employee,
        open_tasks,
        oldest_open_assigned_at,
        if(
            open_tasks > 0,
            {{ seconds_since('oldest_open_assigned_at') }},
            null
        ) as oldest_open_task_age_seconds
    from workload

)

select * from aged
