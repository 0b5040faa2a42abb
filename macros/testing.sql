{% macro rows_differing(expected, actual, columns) -%}
    {#-
        Rows of `expected` missing from `actual` and rows of `actual` not in `expected`
        (CTE names), compared on `columns`; each row says which side it came from. Used by the
        singular tests in tests/data, which pass when it returns nothing.
    -#}
    {%- set cols = columns | join(", ") -%}
    select
        'missing' as problem,
        {{ cols }}
    from {{ expected }}
    where ({{ cols }}) not in (select {{ cols }} from {{ actual }})

    union all

    select
        'unexpected' as problem,
        {{ cols }}
    from {{ actual }}
    where ({{ cols }}) not in (select {{ cols }} from {{ expected }})
{%- endmacro %}

{% macro current_task_per_file(events_relation) -%}
    {#-
        Naive current task per file straight from task_events, for the mart tests: the row with
        the latest (assigned_at, task_id) among non-deleted tasks. Written with LIMIT 1 BY rather
        than argMax over tuples, which ClickHouse evaluates through a slow generic path.
    -#}
    select
        file_id,
        stage,
        employee_code,
        status,
        assigned_at
    from {{ events_relation }}
    where is_deleted = 0
    order by file_id asc, assigned_at desc, task_id desc
    limit 1 by file_id
{%- endmacro %}
