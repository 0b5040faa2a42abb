{#-
    Like accepted_values, but a failure names the offending values: the failing rows are
    (value, n_records), and the values are also logged in the dbt output, e.g.
    "stg_mongo__tasks.stage has values outside the accepted set: 'teleport' (1 row)".
    Nothing is filtered anywhere else, so an unknown value fails here instead of vanishing.
-#}
{% test accepted_values_named(model, column_name, values) %}

{%- set accepted = sql_string_list(values) -%}
{%- set failing -%}
    select
        toString({{ column_name }}) as value,
        count() as n_records
    from {{ model }}
    where {{ column_name }} not in {{ accepted }}
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
