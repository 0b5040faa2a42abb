{% macro generate_schema_name(custom_schema_name, node) -%}
    {#-
        A `+schema` config names the ClickHouse database itself (`analytics`), not a suffix of
        the profile's schema: dbt's default would build `<target.schema>_analytics`. Without one,
        the profile's schema.
    -#}
    {%- if custom_schema_name is none -%}
        {{ target.schema | trim }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
