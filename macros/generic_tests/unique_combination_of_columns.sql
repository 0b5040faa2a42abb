{#- Each combination of `columns` appears at most once; failing rows list the duplicates. -#}
{% test unique_combination_of_columns(model, columns) %}

select
    {{ columns | join(", ") }},
    count() as n_records
from {{ model }}
group by {{ columns | join(", ") }}
having n_records > 1

{% endtest %}
