{{ config(tags=['full_recompute'], enabled=var('full_recompute_tests', false)) }}

-- mart_daily_throughput equals tasks assigned and finished per day and stage recomputed
-- from task_events.

with

tasks as (

    select * from {{ ref('task_events') }}
    where is_deleted = 0

),

assigned as (

    select
        toDate(assigned_at) as day,
        stage,
        count() as tasks_assigned
    from tasks
    group by day, stage

),

finished as (

    select
        toDate(updated_at) as day,
        stage,
        countIf(status = 'done') as tasks_done,
        countIf(status = 'rejected') as tasks_rejected
    from tasks
    group by day, stage

),

expected as (

    select
        day,
        stage,
        sum(tasks_assigned) as tasks_assigned,
        sum(tasks_done) as tasks_done,
        sum(tasks_rejected) as tasks_rejected
    from (
        select
            day,
            stage,
            tasks_assigned,
            0 as tasks_done,
            0 as tasks_rejected
        from assigned
        union all
        select
            day,
            stage,
            0 as tasks_assigned,
            tasks_done,
            tasks_rejected
        from finished
        where tasks_done + tasks_rejected > 0
    ) as movements
    group by day, stage

),

actual as (

    select * from {{ ref('mart_daily_throughput') }}

)

{{ rows_differing(
    'expected', 'actual', ['day', 'stage', 'tasks_assigned', 'tasks_done', 'tasks_rejected']
) }}
