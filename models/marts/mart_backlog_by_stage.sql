{{ config(materialized='view') }}

{#-
    Files by current stage and status: int_backlog_by_stage (a few dozen rows, rebuilt at each
    build) plus the times in stage, computed at read time so they stay current between builds.
    The longest time in stage is that of the oldest assignment.
-#}

with

backlog as (

    select * from {{ ref('int_backlog_by_stage') }}

),

aged as (

    select
        stage,
        stage_order,
        status,
        is_open,
        files,
        oldest_assigned_at,
        {{ seconds_since('oldest_assigned_at') }} as max_time_in_stage_seconds,
        (toUnixTimestamp64Milli({{ read_time() }}) - avg_assigned_at_ms)
        / 1000 as avg_time_in_stage_seconds
    from backlog

)

select * from aged
