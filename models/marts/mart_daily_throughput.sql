{{
    config(
        materialized=when_clustered('distributed_table', 'table'),
        engine=cluster_engine('MergeTree()'),
        sharding_key='cityHash64(stage)',
        order_by='(day, stage)',
    )
}}

{#-
    Per day and stage: tasks assigned (dated by assigned_at) and tasks finished (status done
    or rejected, dated by updated_at of their current version). Deleted tasks are not counted.
    A table rebuilt each run: one pass over four narrow columns of task_events.
-#}

with

tasks as (

    select * from {{ ref('task_events') }}
    where is_deleted = 0

),

movements as (

    select
        toDate(assigned_at) as day,
        stage,
        1 as assigned,
        0 as done,
        0 as rejected
    from tasks

    union all

    select
        toDate(updated_at) as day,
        stage,
        0 as assigned,
        toUInt8(status = 'done') as done,
        toUInt8(status = 'rejected') as rejected
    from tasks
    where status in ('done', 'rejected')

),

daily as (

    select
        day,
        stage,
        any({{ stage_order('stage') }}) as stage_order,
        toUInt64(sum(assigned)) as tasks_assigned,
        toUInt64(sum(done)) as tasks_done,
        toUInt64(sum(rejected)) as tasks_rejected
    from movements
    group by day, stage

)

select * from daily
