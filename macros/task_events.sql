{% macro task_events_changed_task_ids() -%}
    {#-
        Ids of tasks with a raw row loaded after the newest load already reflected in
        `task_events` (`this`). `task_events._loaded_at` is the max over all raw rows of a task,
        so its max is the cursor. Rows stamped exactly at the cursor are re-checked against the
        target, because a load sharing that millisecond may have committed after the last run
        read `raw`; already-applied pairs are skipped so the boundary batch is not redone.
        Cost: a scan of two narrow columns of `raw.tasks`, then primary-key lookups.
    -#}
    select distinct _id
    from {{ source('mongo', 'tasks') }}
    where
        _loaded_at > (select max(_loaded_at) from {{ this }})
        or (
            _loaded_at = (select max(_loaded_at) from {{ this }})
            and (_id, _loaded_at) not in (
                select
                    task_id,
                    _loaded_at
                from {{ this }}
                where _loaded_at = (select max(_loaded_at) from {{ this }})
            )
        )
{%- endmacro %}
