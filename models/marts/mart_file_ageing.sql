{{ config(materialized='view') }}

{#-
    How long files have sat in their current stage, in buckets (0-1d, 1-3d, 3-7d, 7-14d,
    14-30d, 30d+; thresholds: var('age_bucket_days')), per stage. Files that are finished (last stage, status done) are left out:
    they no longer age.
-#}

with

files as (

    select * from {{ ref('pipeline_state') }}
    where not (stage = '{{ var("stages") | last }}' and status = 'done')

),

ageing as (

    select
        stage,
        any(stage_order) as stage_order,
        {{ age_bucket('time_in_stage_seconds') }} as age_bucket,
        any({{ age_bucket_order('time_in_stage_seconds') }}) as age_bucket_order,
        count() as files,
        countIf({{ is_open_status('status') }}) as open_files,
        max(time_in_stage_seconds) as max_time_in_stage_seconds
    from files
    group by stage, age_bucket

)

select * from ageing
