"""Alerts from the data tests that warn: the documents that flowed on although they are odd.

A task with a well-typed stage or status outside the vocabulary (`var('stages')`,
`var('task_statuses')`), or with an `employee_code` the `employee` collection lacks, does not stop
the pipeline: it flows on into `pipeline_state`, flagged (`is_known_stage`, `is_known_status`,
`is_known_employee` = 0), and the tests that catch it (`accepted_values_named`,
`relationships_named`) warn and store their failing rows in `<schema>_dbt_test__audit`
(`store_failures`). One failing row per odd value, with the columns `collection`, `field`,
`value`, `n_records`, `example_ids`, and `vocabulary` (the var holding the accepted values) or
`refers_to` (`<collection>.<field>` the value should be found in).

After a successful build, `stored_failure_alerts` reads the relations of the tests that warned
(`BuildResult.stored_failures`; at most `MAX_VALUES` rows each) and returns one alert per value:
kind `unknown_value` or `unknown_reference`, subject `<collection>.<field>`, value = the number of
documents, and a message naming the value and the document ids. A warned test whose rows have
another shape still gets one `data_test_warning` alert naming its relation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from clickhouse_connect.driver.client import Client

from flows.alerts import Alert
from flows.dbt_build import StoredFailures

# Values listed per warned test; the rest are counted in one more alert naming the relation.
MAX_VALUES = 20
NAMED_COLUMNS = ("collection", "field", "value", "n_records", "example_ids")


def stored_failure_alerts(
    client: Client, warned: Iterable[StoredFailures], run_id: str = ""
) -> list[Alert]:
    """One alert per value stored by each warned data test; never raises (a relation that
    cannot be read becomes an alert saying so)."""
    alerts: list[Alert] = []
    for test in warned:
        try:
            alerts += _alerts_of(client, test, run_id)
        except Exception as exc:  # reporting must not fail a run whose build succeeded
            alerts.append(
                Alert(
                    "data_test_warning",
                    test.test,
                    float(test.failures),
                    0.0,
                    f"data test {test.test} warned ({test.failures} failing rows) but its "
                    f"stored failures {test.relation} could not be read: "
                    f"{type(exc).__name__}: {exc}",
                    run_id,
                )
            )
    return alerts


def _alerts_of(client: Client, test: StoredFailures, run_id: str) -> list[Alert]:
    relation = test.relation
    columns = client.query(f"SELECT * FROM {relation} LIMIT 0").column_names
    if not set(NAMED_COLUMNS) <= set(columns):
        total = client.query(f"SELECT count() FROM {relation}").result_rows[0][0]
        return [
            Alert(
                "data_test_warning",
                test.test,
                float(total),
                0.0,
                f"data test {test.test} warned with {total} failing rows; see "
                f"SELECT * FROM {relation}",
                run_id,
            )
        ]
    result = client.query(
        f"SELECT *, count() OVER () AS total_values FROM {relation}"
        f" ORDER BY n_records DESC, value LIMIT {MAX_VALUES}"
    )
    rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
    alerts = [_value_alert(row, run_id) for row in rows]
    left = int(rows[0]["total_values"]) - len(rows) if rows else 0
    if left > 0:
        last = alerts[-1]
        alerts.append(
            Alert(
                last.kind,
                last.subject,
                float(left),
                0.0,
                f"{last.subject}: {left} more value{_s(left)} than listed; "
                f"SELECT * FROM {relation}",
                run_id,
            )
        )
    return alerts


def _value_alert(row: dict[str, Any], run_id: str) -> Alert:
    subject = f"{row['collection']}.{row['field']}"
    n = int(row["n_records"])
    documents = f"{n} document{_s(n)}"
    value = _quoted(row["value"])
    ids = _ids(row["example_ids"], n)
    if row.get("refers_to"):
        kind = "unknown_reference"
        refers_to = row["refers_to"]
        what = f"{documents} referencing an unknown {row['field']} (not in {refers_to}): {value}"
        fix = f"fix the document or add {value} to {refers_to}"
    else:
        kind = "unknown_value"
        what = f"{documents} with a value outside the vocabulary: {value}"
        vocabulary = row.get("vocabulary")
        target = f"var('{vocabulary}')" if vocabulary else "the accepted values"
        fix = f"fix the document or add the value to {target}"
    message = f"{subject}: {what} ({ids}); it flows on, flagged as unknown; {fix}"
    return Alert(kind, subject, float(n), 0.0, message, run_id)


def _ids(example_ids: Sequence[str], n: int) -> str:
    if not example_ids:
        return "no ids stored"
    listed = ", ".join(str(i) for i in example_ids)
    more = n - len(example_ids)
    return f"ids {listed}" + (f" and {more} more" if more > 0 else "")


def _quoted(value: Any) -> str:
    return repr(str(value))


def _s(n: int) -> str:
    return "" if n == 1 else "s"
