{{ config(tags=['full_recompute'], enabled=var('full_recompute_tests', false)) }}
-- depends_on: {{ ref('task_events') }}

-- Every candidate row of pipeline_state_store names a (file_id, task_id) pair that
-- pipeline_state_members holds: the settling paths find a file's candidates through members,
-- so a store row without its member could never be retracted.

with

store as (

    select distinct
        file_id,
        task_id
    from {{ source('pipeline_state', 'pipeline_state_store') }}

),

members as (

    select
        file_id,
        task_id
    from {{ source('pipeline_state', 'pipeline_state_members') }}

)

select
    store.file_id,
    store.task_id
from store
where (store.file_id, store.task_id) not in (
    select
        members.file_id,
        members.task_id
    from members
)
