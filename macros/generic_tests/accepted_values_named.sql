{#-
    Like accepted_values, but a failure names the offending values and the documents carrying
    them. One failing row per value: `collection`, `field`, `value`, `n_records` (documents with
    that value), `example_ids` (up to `n_examples` ids of `id_column`, smallest first; empty
    without `id_column`) and `vocabulary` (the var holding the accepted values). The values are
    also logged in the dbt output, e.g. "stg_mongo__tasks.stage has values outside the accepted
    set: 'teleport' (1 row, ids 65ab...)". Nothing is filtered anywhere else, so an unknown value
    is reported here instead of vanishing.

    The accepted values are `values`, or the var named by `vocabulary` (e.g. `stages`).
    `collection` (default: the model's name) and `field` (default: the column) say where the
    value comes from, for the stored failures and the flow's alert (flows/data_quality.py).

    `raw` (optional) makes the test on a latest-version view cost a scan of one raw column
    instead of the view's aggregation over every version: {relation, key, column, view_key}.
    A current value outside the set is the value of one of the raw rows of its key, so only
    keys with such a raw row can fail; the view is read for those keys alone (the filter on
    its key reaches the raw table's primary key). Same result, without the full aggregation.
-#}
{% test accepted_values_named(
    model, column_name, values=none, vocabulary=none, raw=none, collection=none, field=none,
    id_column=none, n_examples=5
) %}

{%- set model_name = model_display_name(model, collection) -%}

{%- if values is none and vocabulary is none -%}
    {{ exceptions.raise_compiler_error(
        "accepted_values_named on " ~ column_name ~ ": give `values` or `vocabulary`"
    ) }}
{%- endif -%}
{%- set values = values if values is not none else var(vocabulary) -%}
{%- set accepted = sql_string_list(values) -%}
{%- set condition -%}
    {{ column_name }} not in {{ accepted }}
    {%- if raw is not none %}
    and {{ raw.view_key }} in (
        select {{ raw.key }}
        from {{ raw.relation }}
        where {{ raw.column }} not in {{ accepted }}
    )
    {%- endif %}
{%- endset -%}
{%- set failing = failing_values(
    model, column_name, collection or model_name, field or column_name, id_column, n_examples,
    {'vocabulary': vocabulary or ''}, condition
) -%}

{{ log_failing_values(
    failing,
    model_name ~ "." ~ column_name ~ " has values outside the accepted set",
    "Accepted: " ~ values | join(", ") ~ ". Fix the source documents, or add the value to "
    ~ ("var('" ~ vocabulary ~ "')" if vocabulary else "the accepted values")
    ~ " in dbt_project.yml."
) }}

{{ failing }}

{% endtest %}
