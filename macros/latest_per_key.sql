{% macro latest_per_key(relation, key, order_by, columns, aggregates={}) -%}
    {#-
        The project's one "latest row per key" idiom: one row per `key` of `relation` (a
        relation, a CTE name or a parenthesized subquery), with each of `columns` taken from the
        row with the greatest `order_by` (an expression; a tuple breaks ties), and each of
        `aggregates` ({name: expression}) computed over all the rows of the key.

        One argMax per column (not one over a tuple of columns, nor ORDER BY ... LIMIT 1 BY), so
        a query that needs a few columns reads only those, and a filter on `key` reaches the
        primary key of the table underneath. The inner aliases differ from the column names: in
        ClickHouse an alias is visible in the whole SELECT and would shadow the column inside
        the other aggregates; the outer SELECT gives the names back.
    -#}
    {%- set names = columns + (aggregates | list) -%}
    {%- set inner = [] -%}
    {%- for column in columns -%}
        {%- do inner.append("argMax(" ~ column ~ ", " ~ order_by ~ ") as latest_" ~ column) -%}
    {%- endfor -%}
    {%- for name, expression in aggregates.items() -%}
        {%- do inner.append(expression ~ " as latest_" ~ name) -%}
    {%- endfor -%}
    select
        {{ key }},
        {%- for name in names %}
        latest_{{ name }} as {{ name }}{{ "," if not loop.last }}
        {%- endfor %}
    from (
        select
            {{ key }},
            {{ inner | join(",\n            ") }}
        from {{ relation }}
        group by {{ key }}
    )
{%- endmacro %}

{% macro latest_version_per_id(relation, columns) -%}
    {#-
        The current version of every document of a raw table (`relation`, deduplicated by
        `_id` with `_version`): `columns` and the bookkeeping columns of the row with the highest
        `_version`, and `_loaded_at`, the last time any version was loaded (the incremental
        cursor downstream). Equal versions are re-loads of one document version, identical but
        for bookkeeping.
    -#}
    {{ latest_per_key(
        relation, '_id', '_version', columns + ['_id_created_at', 'is_deleted', '_run_id'],
        {'_version': 'max(_version)', '_loaded_at': 'max(_loaded_at)'}
    ) }}
{%- endmacro %}

{% macro latest_row_per_id(relation, columns, id_filter) -%}
    {#-
        latest_version_per_id's rule for a few documents read whole: the row with the highest
        `_version` of each `_id` of `relation` matching `id_filter`, its `columns` (expressions).
        ORDER BY ... LIMIT 1 BY plans faster than the aggregate for the handful of ids a filter
        on the primary key leaves (the follower's settle, after every micro-batch).
    -#}
    select
        {{ columns | join(",\n        ") }}
    from {{ relation }}
    where {{ id_filter }}
    order by _id, _version desc
    limit 1 by _id
{%- endmacro %}

{% macro raw_bookkeeping_columns() -%}
    {#- the loader's bookkeeping columns of a latest_version_per_id row, as staging names them -#}
    toUInt8(is_deleted) as is_deleted,
    _version,
    _loaded_at,
    _run_id
{%- endmacro %}
