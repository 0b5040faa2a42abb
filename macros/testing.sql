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
