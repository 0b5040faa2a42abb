{{ config(materialized='view') }}

{#-
    Current state per file: int_pipeline_state_current (rebuilt at each build from
    pipeline_state_store, which a materialized view on task_events keeps; see
    macros/pipeline_state.sql) plus the time in stage, computed at read time. A read scans one
    row per file and never touches task_events.
-#}

with

current_files as (

    select * from {{ ref('int_pipeline_state_current') }}

),

aged as (

    select
        file_id,
        stage,
        stage_order,
        is_known_stage,
        status,
        is_known_status,
        employee_code,
        employee_name,
        is_known_employee,
        assigned_at,
        task_id,
        dateDiff('second', assigned_at, {{ read_time() }}) as time_in_stage_seconds
    from current_files

)

select * from aged
