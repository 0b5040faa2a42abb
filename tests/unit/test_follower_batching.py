"""How the change-stream follower's micro-batch measures its age (`loader.follower`)."""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from loader.follower import _MicroBatch


def _insert() -> dict[str, Any]:
    oid = ObjectId()
    return {"operationType": "insert", "documentKey": {"_id": oid}, "fullDocument": {"_id": oid}}


def test_a_batch_that_piled_up_during_a_flush_is_as_old_as_the_flush() -> None:
    batch = _MicroBatch()
    batch.clear(unread_since=10.0)  # a flush began at 10.0: the stream was not read since

    batch.add(_insert(), 10.3, 0)  # read once the flush was done
    batch.add(_insert(), 10.31, 0)

    assert batch.first_at == 10.0


def test_the_first_batch_of_a_follower_is_as_old_as_its_first_event() -> None:
    batch = _MicroBatch()  # nothing flushed yet: no time the stream went unread

    batch.add(_insert(), 10.3, 0)

    assert batch.first_at == 10.3
