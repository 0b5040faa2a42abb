{{ config(tags=['full_recompute'], enabled=var('full_recompute_tests', false)) }}

-- pipeline_state (kept by the materialized view and its correction path) must equal, row for
-- row, the naive argMax over the current version of every non-deleted task (recomputed from
-- raw). Returns the differing rows, labelled by side.

with

expected as (

    select * from {{ ref('int_file_state_recomputed') }}

),

actual as (

    select * from {{ ref('pipeline_state') }}

)

{{ rows_differing(
    'expected', 'actual',
    ['file_id', 'stage', 'employee_code', 'status', 'assigned_at', 'task_id']
) }}
