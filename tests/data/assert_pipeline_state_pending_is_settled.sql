-- depends_on: {{ ref('task_events') }}

-- After a build, the post-hook of task_events has settled every task the pre-hook recorded
-- and emptied pipeline_state_pending: a row left means a change the store never settled.

select
    task_id,
    file_id,
    rebuild_all,
    recorded_at
from {{ source('pipeline_state', 'pipeline_state_pending') }}
