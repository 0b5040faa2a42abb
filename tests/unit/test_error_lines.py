"""The one-line errors every CLI prints (`loader.errors`), without servers: they name the env
var to fix, never show a password, and say whether a failed sync moved its watermark."""

from __future__ import annotations

from loader.errors import describe, one_line, redact, watermark_outcome
from loader.watermark import Watermark

BEFORE = Watermark(1_767_268_800_000, "65a000000000000000000001", 1_767_268_900_000)
FURTHER = Watermark(1_767_268_800_000, "65a000000000000000000002", 1_767_269_000_000)


def test_the_password_of_a_connection_string_is_hidden() -> None:
    assert redact("at mongodb://pipeline:s3cret@mongo-1:27017/?replicaSet=rs0") == (
        "at mongodb://pipeline:***@mongo-1:27017/?replicaSet=rs0"
    )


def test_a_connection_string_without_a_password_is_left_as_it_is() -> None:
    text = "redis://redis.internal:6379/0 and mongodb://mongo-1:27017/"

    assert redact(text) == text


def test_a_message_over_several_lines_becomes_one_line_without_its_password() -> None:
    assert (
        one_line("refused\n  by redis://u:p@host:6379/0\n")
        == "refused by redis://u:***@host:6379/0"
    )


def test_a_failed_sync_that_stored_batches_says_where_its_watermark_moved() -> None:
    after, sentence = watermark_outcome("tasks", BEFORE, FURTHER)

    assert after == FURTHER
    assert sentence.startswith(f"the watermark of tasks moved to {FURTHER.describe()} (from ")
    assert sentence.endswith("the next run resumes there")


def test_a_failed_sync_that_stored_nothing_says_its_watermark_did_not_move() -> None:
    assert watermark_outcome("tasks", BEFORE, None) == (
        BEFORE,
        f"the watermark of tasks did not move (still {BEFORE.describe()})",
    )


def test_a_watermark_saved_behind_the_stored_one_did_not_move_it() -> None:
    after, sentence = watermark_outcome("tasks", FURTHER, BEFORE)

    assert (after, sentence.split(" (")[0]) == (FURTHER, "the watermark of tasks did not move")


def test_the_first_failed_sync_of_a_collection_says_none_was_stored() -> None:
    assert watermark_outcome("employee", None, None) == (
        None,
        "the watermark of employee did not move (none stored yet)",
    )


def test_a_temporary_prefect_server_that_did_not_start_says_what_to_do() -> None:
    line = describe(
        RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
    )
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line and "run again" in line


def test_dbt_unable_to_reach_clickhouse_names_the_variables_and_the_server() -> None:
    class DbtBuildError(RuntimeError):  # dbt's failure as flows.dbt_build raises it, by name
        pass

    line = describe(
        DbtBuildError(
            "Error HTTPConnectionPool(host='127.0.0.1', port=8123): Max retries exceeded with "
            "url: / (Caused by NewConnectionError: [Errno 111] Connection refused) "
            "executing HTTP request attempt 1 (http://127.0.0.1:8123)"
        )
    )
    assert "CLICKHOUSE_HOST / CLICKHOUSE_PORT" in line and "`make up`" in line
