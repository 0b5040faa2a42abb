"""The change-stream follower as a process of its own, for the hot-path reliability scenarios
(servers come from the contract env vars).

python follower_worker.py [--pause-at-stored N]
    `follow_changes(tasks, all_changes=True)` until SIGTERM, announcing on stdout, one line each:
    `ready` after its first flush (the stream is open), `stored <n>` once batch n is in raw (its
    resume token not saved yet: the follower's `after_store` hook), `settled <json>` once a
    batch is settled (`StoredBatch`: events, rows, deletes, lag_seconds), `retry <message>` when
    it meets a transient error and retries, `done <json>` at the end. With
    `--pause-at-stored N` it waits for a line on stdin at `stored N`, so the parent kills it
    exactly between storing a batch and saving its position.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any

from worker import AnnounceRetries, say

from loader.follower import StoredBatch, follow_changes
from loader.settings import Settings


class Announcer:
    def __init__(self, pause_at_stored: int | None) -> None:
        self.pause_at_stored = pause_at_stored
        self.stored = 0
        self.ready = False

    def after_store(self) -> None:
        self.stored += 1
        say(f"stored {self.stored}")
        if self.stored == self.pause_at_stored:
            sys.stdin.readline()  # the parent kills this process here

    def on_flush(self, events: int, deletes: int) -> None:
        if not self.ready:
            self.ready = True
            say("ready")

    def on_stored(self, batch: StoredBatch) -> None:
        row: dict[str, Any] = asdict(batch)
        row.pop("settled", None)
        say("settled " + json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pause-at-stored", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("loader").addHandler(AnnounceRetries(logging.WARNING))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    points = Announcer(args.pause_at_stored)
    result = follow_changes(
        Settings(),
        "tasks",
        all_changes=True,
        stop=stop,
        after_store=points.after_store,
        on_flush=points.on_flush,
        on_stored=points.on_stored,
    )
    say("done " + json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
