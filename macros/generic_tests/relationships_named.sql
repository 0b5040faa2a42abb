{#-
    Like relationships (every value of the column is a `field` of `to`), but a failure names the
    unresolved values and the documents carrying them. One failing row per value: `collection`,
    `field`, `value`, `n_records` (rows with that value), `example_ids` (up to `n_examples` ids
    of `id_column`, smallest first; empty without `id_column`) and `refers_to`
    (`<to_collection or to>.<field>`). The values are also logged in the dbt output, e.g.
    "tasks.employee_code has values not found in employee.employee_code: 'E-999' (1 row, ids
    65ab...)". A `where` config filters the model as for any generic test.

    `collection` (default: the model's name) and `source_field` (default: the column) say where
    the value comes from, `to_collection` (default: the name of `to`) where it should be found,
    for the stored failures and the flow's alert (flows/data_quality.py).
-#}
{% test relationships_named(
    model, column_name, to, field, collection=none, source_field=none, to_collection=none,
    id_column=none, n_examples=5
) %}

{%- set model_name = model_display_name(model, collection) -%}
{%- set to_name = to_collection or (to.identifier if to.identifier is defined else to | string) -%}
{%- set refers_to = to_name ~ "." ~ field -%}
{%- set condition -%}
    {{ column_name }} is not null
    and {{ column_name }} not in (
        select {{ field }}
        from {{ to }}
        where {{ field }} is not null
    )
{%- endset -%}
{%- set failing = failing_values(
    model, column_name, collection or model_name, source_field or column_name, id_column,
    n_examples, {'refers_to': refers_to}, condition
) -%}

{{ log_failing_values(
    failing,
    model_name ~ "." ~ column_name ~ " has values not found in " ~ refers_to,
    "Fix the source documents, or add the missing " ~ field ~ "."
) }}

{{ failing }}

{% endtest %}
