"""Subprocesses of the reliability scenarios (servers come from the contract env vars).

python worker.py sync [--collection tasks] [--batch-size N]
    One `sync_collection`, printing `insert <n>` before each raw insert and `stored <n>` once
    batch n is in ClickHouse (before its watermark is saved), so the parent can kill it at a
    chosen point; `done <json>` at the end.
python worker.py write --stop-file PATH [--seed N]
    A writer: updates, inserts and deletes tasks until PATH exists; `wrote <json>` at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo import MongoClient

from loader import sync as sync_module
from loader.settings import Settings
from loader.synthetic import mutate


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_sync(collection: str, batch_size: int | None) -> None:
    inserts = 0
    original = sync_module._Run._insert_rows

    def announced(self: Any, batch: Any) -> None:
        nonlocal inserts
        inserts += 1
        say(f"insert {inserts}")
        original(self, batch)

    # Instrumentation only: the real insert runs unchanged right after the announcement.
    sync_module._Run._insert_rows = announced  # type: ignore[method-assign]
    result = sync_module.sync_collection(
        Settings(),
        collection,
        batch_size=batch_size,
        after_insert=lambda stored: say(f"stored {stored.batch_no}"),
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
    w = sub.add_parser("write")
    w.add_argument("--stop-file", type=Path, required=True)
    w.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.command == "sync":
        run_sync(args.collection, args.batch_size)
    else:
        run_writer(args.stop_file, args.seed)


if __name__ == "__main__":
    main()
