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
