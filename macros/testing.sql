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
    {#- naive current task per file straight from task_events, for the mart tests -#}
    select
        file_id,
        tupleElement(current_task, 1) as stage,
        tupleElement(current_task, 2) as employee_code,
        tupleElement(current_task, 3) as status,
        tupleElement(current_task, 4) as assigned_at
    from (
        select
            file_id,
            argMax(
                tuple(stage, employee_code, status, assigned_at),
                tuple(assigned_at, task_id)
            ) as current_task
        from {{ events_relation }}
        where is_deleted = 0
        group by file_id
    )
{%- endmacro %}
