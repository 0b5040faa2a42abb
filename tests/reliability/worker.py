"""Subprocesses of the reliability scenarios (servers come from the contract env vars).

python worker.py sync [--collection tasks] [--batch-size N] [--pause-at PHASE:N]
    One `sync_collection`, announcing its fault points on stdout, one line each:
    `insert <n>` before batch n's first write to ClickHouse (the batch is read and mapped),
    `stored <n>` once batch n is in ClickHouse (its watermark not yet saved), `saved <n>` once
    its watermark is saved (before the next read). These come from the loader's own hooks on
    whichever decoder path the batch takes. With `--pause-at insert:3` the worker waits for a
    line on stdin after announcing that point, so the parent injects its fault (SIGKILL, a
    server killed or stepped down) at exactly that point. `retry <message>` when the loader
    meets a transient error and retries or resumes; `done <json>` at the end.
python worker.py write --stop-file PATH [--seed N]
    A writer: updates, inserts and deletes tasks until PATH exists; `wrote <json>` at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo import MongoClient

from loader.settings import Settings
from loader.sync import BatchStored, sync_collection
from synthetic import mutate

PHASES = ("insert", "stored", "saved")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class FaultPoints:
    """The loader's hooks, announced; pauses at the chosen one until the parent says go."""

    def __init__(self, pause_at: tuple[str, int] | None) -> None:
        self.pause_at = pause_at
        self.saved = 0

    def reached(self, phase: str, n: int) -> None:
        say(f"{phase} {n}")
        if self.pause_at == (phase, n):
            sys.stdin.readline()  # the parent injects its fault, then writes a line

    # sync_collection's hooks
    def before_insert(self, n: int) -> None:
        self.reached("insert", n)

    def after_insert(self, stored: BatchStored) -> None:
        self.reached("stored", stored.batch_no)

    # ProgressSink: `advance` runs once the batch's watermark is saved
    def start(self, collection: str, total: int | None) -> None:
        pass

    def advance(self, docs: int) -> None:
        self.saved += 1
        self.reached("saved", self.saved)


class AnnounceRetries(logging.Handler):
    """`retry <message>` for every transient error the loader retries or resumes after."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "retrying" in message or "resuming" in message:
            say("retry " + " ".join(message.split())[:200])


def run_sync(collection: str, batch_size: int | None, pause_at: tuple[str, int] | None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("loader").addHandler(AnnounceRetries(logging.WARNING))
    points = FaultPoints(pause_at)
    result = sync_collection(
        Settings(),
        collection,
        batch_size=batch_size,
        before_insert=points.before_insert,
        after_insert=points.after_insert,
        progress=points,
    )
    say("done " + json.dumps(result.as_dict()))


def run_writer(stop_file: Path, seed: int) -> None:
    settings = Settings()
    client: MongoClient = MongoClient(settings.mongo_uri)
    db = client[settings.mongo_db]
    rng = random.Random(seed)
    counts = {"mutated": 0, "inserted": 0, "deleted": 0, "ticks": 0}
    tick = 0
    while not stop_file.exists():
        tick += 1
        result = mutate(db, rng.randint(5, 60), seed=seed * 100_000 + tick)
        counts["mutated"] += result.updated
        counts["inserted"] += result.inserted
        # Deletes: a few random tasks (their file may keep other stages).
        victims = list(db.tasks.aggregate([{"$sample": {"size": rng.randint(0, 8)}}]))
        if victims:
            gone = db.tasks.delete_many({"_id": {"$in": [v["_id"] for v in victims]}})
            counts["deleted"] += gone.deleted_count
        # Brand-new files now and then, outside mutate's bookkeeping.
        if rng.random() < 0.3:
            now = time.time()
            doc = {
                "_id": ObjectId(),
                "file_id": f"W{seed}-{tick:06d}",
                "stage": "intake",
                "employee_code": "E00000",
                "employee_name": "Writer Process",
                "status": "assigned",
                "assigned_at": _ms_datetime(now),
                "updated_at": _ms_datetime(now),
            }
            db.tasks.insert_one(doc)
            counts["inserted"] += 1
        counts["ticks"] = tick
        time.sleep(rng.uniform(0.0, 0.05))
    client.close()
    say("wrote " + json.dumps(counts))


def _ms_datetime(seconds: float) -> Any:
    from datetime import UTC, datetime

    dt = datetime.fromtimestamp(seconds, UTC)
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync")
    s.add_argument("--collection", default="tasks")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--pause-at", default=None, help="PHASE:N, PHASE one of " + ", ".join(PHASES))
    w = sub.add_parser("write")
    w.add_argument("--stop-file", type=Path, required=True)
    w.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.command == "sync":
        pause_at = None
        if args.pause_at:
            phase, _, n = args.pause_at.partition(":")
            if phase not in PHASES:
                parser.error(f"--pause-at: unknown phase {phase!r}")
            pause_at = (phase, int(n))
        run_sync(args.collection, args.batch_size, pause_at)
    else:
        run_writer(args.stop_file, args.seed)


if __name__ == "__main__":
    main()
