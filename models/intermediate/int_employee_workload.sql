{{ config(materialized='view') }}

{#-
    Open work per employee, aggregated at read time from int_pipeline_state_current (live) and
    mart_employees (one row per employee): the files whose current task is assigned to the
    employee with an open status (var('open_statuses')) and the oldest such assignment. Every
    employee of the dimension appears (zero when idle); a code missing from the dimension still
    appears, with is_known_employee = 0, instead of vanishing. The age of the oldest open task
    depends on the clock: mart_employee_workload computes it at read time.
-#}

with

files as (

    select * from {{ ref('int_pipeline_state_current') }}

),

employees as (

    select * from {{ ref('mart_employees') }}

),

open_work as (

    select
        employee_code,
        count() as open_tasks,
        min(assigned_at) as oldest_open_assigned_at
    from files
    where {{ is_open_status('status') }}
    group by employee_code

),

workload as (

    select
        if(employees.employee_code != '', employees.employee_code, open_work.employee_code)
            as employee_code,
        employees.employee_name,
        employees.team,
        employees.is_active,
        employees.is_deleted,
        employees.employee_code != '' as is_known_employee,
        open_work.open_tasks,
        if(open_work.open_tasks > 0, open_work.oldest_open_assigned_at, null)
            as oldest_open_assigned_at
    from employees
    full outer join open_work on employees.employee_code = open_work.employee_code

)

select * from workload
