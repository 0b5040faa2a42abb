{#- Helpers of the tests whose failing rows name values and documents (`*_named`). -#}

{% macro example_ids(id_column, n_examples) -%}
    {#- up to n_examples ids of the group, smallest first; an empty array without id_column -#}
    {%- if id_column is not none -%}
        groupArraySorted({{ n_examples }})(toString({{ id_column }}))
    {%- else -%}
        cast([], 'Array(String)')
    {%- endif -%}
{%- endmacro %}

{% macro log_failing_values(failing, headline, hint) -%}
    {#-
        Log "<headline>: 'v' (n rows, ids a, b), ... <hint>" when `failing` (columns value,
        n_records, example_ids) returns rows: the dbt output names what failed.
    -#}
    {%- if execute -%}
        {%- set found = run_query(
            "select value, n_records, arrayStringConcat(example_ids, ', ') from ("
            ~ failing ~ ") order by value limit 20"
        ) -%}
        {%- if found.rows | length > 0 -%}
            {%- set listed = [] -%}
            {%- for row in found.rows -%}
                {%- do listed.append(
                    "'" ~ row[0] ~ "' (" ~ row[1] ~ " row" ~ ("s" if row[1] != 1 else "")
                    ~ ((", ids " ~ row[2]) if row[2] else "") ~ ")"
                ) -%}
            {%- endfor -%}
            {{ log(headline ~ ": " ~ listed | join(", ") ~ ". " ~ hint, info=True) }}
        {%- endif -%}
    {%- endif -%}
{%- endmacro %}

{% macro model_display_name(model, collection) -%}
    {#- `model` is a relation, or with a `where` config the subquery dbt wraps around it -#}
    {{ return(model.identifier if model.identifier is defined else collection or "model") }}
{%- endmacro %}

{% macro failing_values(model, column_name, collection, field, id_column, n_examples, about, condition) -%}
    {#-
        One row per offending value of `column_name` in `model` (rows matching `condition`):
        `collection`, `field`, `value`, `n_records`, `example_ids`, and the column named by
        the key of `about` ({column: text}, e.g. {'vocabulary': 'stages'}) saying what the
        value was checked against.
    -#}
    {%- set about_column, about_text = (about.items() | list)[0] -%}
    select
        {{ sql_string_literal(collection) }} as collection,
        {{ sql_string_literal(field) }} as field,
        toString({{ column_name }}) as value,
        count() as n_records,
        {{ example_ids(id_column, n_examples) }} as example_ids,
        {{ sql_string_literal(about_text) }} as {{ about_column }}
    from {{ model }}
    where {{ condition }}
    group by value
{%- endmacro %}
