{{ config(materialized='view') }}

{#- Files by current stage and status, from pipeline_state (no event scan). -#}

with

files as (

    select * from {{ ref('pipeline_state') }}

),

backlog as (

    select
        stage,
        any(stage_order) as stage_order,
        status,
        {{ is_open_status('status') }} as is_open,
        count() as files,
        min(assigned_at) as oldest_assigned_at,
        max(time_in_stage_seconds) as max_time_in_stage_seconds,
        avg(time_in_stage_seconds) as avg_time_in_stage_seconds
    from files
    group by stage, status

)

select * from backlog
