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

{% macro age_bucket_labels() -%}
    {#- the labels of the ageing buckets, youngest first: '0-1d', '1-3d', ..., '30d+', from the
        thresholds var('age_bucket_days') (upper bounds in days; the last bucket has none) -#}
    {%- set days = var('age_bucket_days') -%}
    {%- set labels = [] -%}
    {%- for upper in days -%}
        {%- do labels.append((loop.previtem if not loop.first else 0) ~ "-" ~ upper ~ "d") -%}
    {%- endfor -%}
    {%- do labels.append(days | last ~ "d+") -%}
    {{ return(labels) }}
{%- endmacro %}

{% macro age_bucket(seconds) -%}
    {#- label of the ageing bucket (age_bucket_labels) for an age in seconds -#}
    {%- set days = var('age_bucket_days') -%}
    {%- set labels = age_bucket_labels() -%}
    multiIf(
        {%- for upper in days %}
        {{ seconds }} < {{ upper }} * 86400, '{{ labels[loop.index0] }}',
        {%- endfor %}
        '{{ labels | last }}'
    )
{%- endmacro %}

{% macro age_bucket_order(seconds) -%}
    {#- 1-based position of the bucket age_bucket gives (the last one: no upper bound) -#}
    {%- set days = var('age_bucket_days') -%}
    multiIf(
        {%- for upper in days %}
        {{ seconds }} < {{ upper }} * 86400, {{ loop.index }},
        {%- endfor %}
        {{ days | length + 1 }}
    )
{%- endmacro %}

{% macro seconds_since(column) -%}
    {#- age in seconds of the time `column` at read_time() (the clock, or the var `as_of`) -#}
    dateDiff('second', {{ column }}, {{ read_time() }})
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
