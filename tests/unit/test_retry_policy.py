"""The loader's one retry policy (`loader.clients.retrying`), without servers: transient errors
are retried, and given up after LOADER_RETRY_ATTEMPTS failures in a row; an operation that
makes progress between failures (a read resumed at its last stored batch) starts a new count."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pymongo.errors import AutoReconnect

from loader.clients import ServerUnavailable, mongo_call
from loader.settings import Settings
from loader.sync import SyncResult

SETTINGS = Settings(retry_attempts=3, retry_initial_wait=0.0, retry_max_wait=0.0)


class Flaky:
    """A read that stores batch after batch, resuming where the last attempt stopped: step n
    (1-based, over all attempts) fails with a transient error when n is in `failing`, else
    stores a batch; done after `batches_needed` batches."""

    def __init__(self, failing: set[int], batches_needed: int) -> None:
        self.failing = failing
        self.batches_needed = batches_needed
        self.steps = 0
        self.batches = 0

    def __call__(self) -> str:
        while True:
            self.steps += 1
            if self.steps in self.failing:
                raise AutoReconnect(f"connection reset (injected, step {self.steps})")
            self.batches += 1
            if self.batches == self.batches_needed:
                return "done"


def call_with_progress(flaky: Flaky) -> Callable[[], str]:
    return lambda: mongo_call(SETTINGS, flaky, progress=lambda: flaky.batches)


def test_failures_spread_between_stored_batches_do_not_exhaust_the_retries() -> None:
    # Five failures in all, more than the three attempts, but never two in a row.
    flaky = Flaky(failing={2, 4, 6, 8, 10}, batches_needed=6)

    assert call_with_progress(flaky)() == "done"


def test_failures_in_a_row_without_progress_give_up_naming_the_server() -> None:
    flaky = Flaky(failing={2, 3, 4}, batches_needed=6)

    with pytest.raises(ServerUnavailable, match="MongoDB .* unreachable .* MONGO_URI"):
        call_with_progress(flaky)()

    assert flaky.steps == 4  # one batch stored, then three failures in a row


def test_without_progress_every_failure_counts() -> None:
    # The same read, its progress not told: three failures in all are the end of it.
    flaky = Flaky(failing={2, 4, 6}, batches_needed=6)

    with pytest.raises(ServerUnavailable):
        mongo_call(SETTINGS, flaky)

    assert flaky.batches == 3


def test_a_sync_result_is_its_run_record_ready_for_json() -> None:
    import json

    result = SyncResult("run-1", "tasks", docs_read=3, index_created=True)

    as_json = json.loads(json.dumps(result.as_dict()))
    assert (as_json["status"], as_json["kind"], as_json["docs_read"]) == ("ok", "sync", 3)
    assert as_json["index_created"] is True and as_json["duration_s"] >= 0
