{{ config(tags=['full_recompute'], enabled=var('full_recompute_tests', false)) }}

-- mart_file_ageing equals files per current stage and age bucket recomputed from
-- task_events. now64() is fixed for the whole query, so both sides age files alike.

with

current_files as (

    {{ current_task_per_file(ref('task_events')) }}

),

expected as (

    select
        stage,
        {{ age_bucket("dateDiff('second', assigned_at, now64(3))") }} as age_bucket,
        count() as files
    from current_files
    where not (stage = '{{ var("stages") | last }}' and status = 'done')
    group by stage, age_bucket

),

actual as (

    select * from {{ ref('mart_file_ageing') }}

)

{{ rows_differing('expected', 'actual', ['stage', 'age_bucket', 'files']) }}
