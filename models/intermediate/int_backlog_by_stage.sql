{{ config(materialized='view') }}

{#-
    Files per current stage and status, with the assignment times the ages are derived from:
    a few dozen rows aggregated at read time from int_pipeline_state_current (live: a write
    that reached pipeline_state_store counts at once). The ages
    themselves depend on the clock, so mart_backlog_by_stage computes them at read time.
-#}

with

files as (

    select * from {{ ref('int_pipeline_state_current') }}

),

backlog as (

    select
        stage,
        any(stage_order) as stage_order,
        status,
        cast({{ is_open_status('status') }}, 'UInt8') as is_open,
        count() as files,
        min(assigned_at) as oldest_assigned_at,
        avg(toUnixTimestamp64Milli(assigned_at)) as avg_assigned_at_ms
    from files
    group by stage, status

)

select * from backlog
