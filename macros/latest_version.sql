{% macro latest_version_per_id(relation, columns) -%}
    {#-
        One row per `_id` of a raw table: the value of each of `columns` (as `latest_<column>`)
        and of the bookkeeping columns in the row with the highest `_version`.
        One argMax per column (not one over a tuple), so a query that needs a few columns reads
        only those. The aliases differ from the source names: in ClickHouse an alias is visible
        in the whole SELECT and would shadow the column inside the other aggregates. Equal
        versions are re-loads of the same document version, identical but for bookkeeping.
    -#}
    select
        _id,
        {%- for column in columns %}
        argMax({{ column }}, _version) as latest_{{ column }},
        {%- endfor %}
        argMax(_id_created_at, _version) as latest_id_created_at,
        argMax(is_deleted, _version) as latest_is_deleted,
        argMax(_run_id, _version) as latest_run_id,
        max(_version) as latest_version,
        -- the last time any version was loaded: the incremental cursor downstream
        max(_loaded_at) as last_loaded_at
    from {{ relation }}
    group by _id
{%- endmacro %}
