{#- Helpers over the project vocabularies (`vars` in dbt_project.yml). -#}

{% macro sql_string_literal(value) -%}
    {#- 'a' from a string, backslashes and quotes escaped -#}
    '{{ value | string | replace("\\", "\\\\") | replace("'", "\\'") }}'
{%- endmacro %}

{% macro sql_string_list(values) -%}
    {#- ('a', 'b') from a list of strings, quotes escaped -#}
    ({%- for value in values -%}
        {{ sql_string_literal(value) }}{{ ", " if not loop.last }}
    {%- endfor -%})
{%- endmacro %}

{% macro stage_order(column) -%}
    {#- 1-based position of the stage in the pipeline, 0 for a value outside var('stages') -#}
    indexOf([{%- for stage in var('stages') -%}'{{ stage }}'{{ ", " if not loop.last }}{%- endfor -%}], {{ column }})
{%- endmacro %}

{% macro in_vocabulary(column, name) -%}
    {#- 1 when the value is in the vocabulary var(name) (e.g. `stages`), else 0; a plain UInt8
        even for a LowCardinality column (a table cannot store LowCardinality(UInt8)) -#}
    cast({{ column }} in {{ sql_string_list(var(name)) }} as UInt8)
{%- endmacro %}

{% macro is_open_status(column) -%}
    {{ column }} in {{ sql_string_list(var('open_statuses')) }}
{%- endmacro %}

{% macro age_bucket(seconds) -%}
    {#- label of the ageing bucket for an age in seconds; see age_bucket_order -#}
    multiIf(
        {{ seconds }} < 86400, '0-1d',
        {{ seconds }} < 3 * 86400, '1-3d',
        {{ seconds }} < 7 * 86400, '3-7d',
        {{ seconds }} < 14 * 86400, '7-14d',
        {{ seconds }} < 30 * 86400, '14-30d',
        '30d+'
    )
{%- endmacro %}

{% macro age_bucket_order(seconds) -%}
    multiIf(
        {{ seconds }} < 86400, 1,
        {{ seconds }} < 3 * 86400, 2,
        {{ seconds }} < 7 * 86400, 3,
        {{ seconds }} < 14 * 86400, 4,
        {{ seconds }} < 30 * 86400, 5,
        6
    )
{%- endmacro %}

{% macro read_time() -%}
    {#- The clock ages are computed against: now64(3), when the view is read. The var `as_of`
        (a UTC time, e.g. '2026-01-15 12:00:00') freezes it at build time, so that tests can
        place files at exact ages (86,399 s, 86,401 s) and check every figure. -#}
    {%- if var('as_of', none) -%}
        toDateTime64('{{ var("as_of") }}', 3, 'UTC')
    {%- else -%}
        now64(3)
    {%- endif -%}
{%- endmacro %}
