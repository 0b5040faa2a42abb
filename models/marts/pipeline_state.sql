{{ config(materialized='view') }}

{#-
    Current state per file: int_pipeline_state_current (pipeline_state_store read live with
    FINAL; materialized views on raw.tasks feed the store and the change-stream follower settles
    retractions, see macros/pipeline_state.sql) plus the time in stage, computed at read time.
    A read sees one row per file and never touches task_events.
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
        {{ seconds_since('assigned_at') }} as time_in_stage_seconds
    from current_files

)

select * from aged
