{#-
    Like accepted_values, but a failure names the offending values: the failing rows are
    (value, n_records), and the values are also logged in the dbt output, e.g.
    "stg_mongo__tasks.stage has values outside the accepted set: 'teleport' (1 row)".
    Nothing is filtered anywhere else, so an unknown value fails here instead of vanishing.

    `raw` (optional) makes the test on a latest-version view cost a scan of one raw column
    instead of the view's aggregation over every version: {relation, key, column, view_key}.
    A current value outside the set is the value of one of the raw rows of its key, so only
    keys with such a raw row can fail; the view is read for those keys alone (the filter on
    its key reaches the raw table's primary key). Same result, without the full aggregation.
-#}
{% test accepted_values_named(model, column_name, values, raw=none) %}

{%- set accepted = sql_string_list(values) -%}
{%- set failing -%}
    select
        toString({{ column_name }}) as value,
        count() as n_records
    from {{ model }}
    where
        {{ column_name }} not in {{ accepted }}
        {%- if raw is not none %}
        and {{ raw.view_key }} in (
            select {{ raw.key }}
            from {{ raw.relation }}
            where {{ raw.column }} not in {{ accepted }}
        )
        {%- endif %}
    group by value
{%- endset -%}

{%- if execute -%}
    {%- set found = run_query(failing ~ " order by value limit 20") -%}
    {%- if found.rows | length > 0 -%}
        {%- set listed = [] -%}
        {%- for row in found.rows -%}
            {%- do listed.append("'" ~ row[0] ~ "' (" ~ row[1] ~ " row" ~ ("s" if row[1] != 1 else "") ~ ")") -%}
        {%- endfor -%}
        {{ log(
            model.identifier ~ "." ~ column_name ~ " has values outside the accepted set: "
            ~ listed | join(", ") ~ ". Accepted: " ~ values | join(", ")
            ~ ". Fix the source documents, or add the value to the vars in dbt_project.yml.",
            info=True
        ) }}
    {%- endif -%}
{%- endif -%}

{{ failing }}

{% endtest %}
