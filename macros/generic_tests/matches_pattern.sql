{#- Every non-null value matches the RE2 `pattern`; failing rows list the offending values. -#}
{% test matches_pattern(model, column_name, pattern) %}

select
    {{ column_name }} as value,
    count() as n_records
from {{ model }}
where not match({{ column_name }}, '{{ pattern }}')
group by value

{% endtest %}
