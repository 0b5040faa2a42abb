"""Arrow decoding of raw batches, without servers: it loads exactly what `BatchMapper` loads."""

from __future__ import annotations

from typing import Any

import bson
import pyarrow as pa
from bson import ObjectId
from bson.errors import InvalidDocument, InvalidStringData
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from mapping_cases import GOOD_EMPLOYEE, GOOD_TASK, field_values
from mongo_oracle import AS_STORED, contract_problems

from loader.columnar import decode_valid_rows, object_id_columns
from loader.mapping import CODEC_OPTIONS, BatchMapper, to_arrow, with_bookkeeping
from loader.schema import fields_of

MAX_CHARS = 20
RUN_ID = "test-run"
LOADED_AT_MS = 1_764_633_600_000


def _document_path(raw: bytes, collection: str) -> tuple[BatchMapper, Any]:
    mapper = BatchMapper(collection, MAX_CHARS)
    for doc in bson.decode_all(raw, CODEC_OPTIONS):
        mapper.add(doc)
    return mapper, mapper.take()


def _documents(collection: str) -> st.SearchStrategy[list[dict[str, Any]]]:
    base = GOOD_TASK if collection == "tasks" else GOOD_EMPLOYEE
    names = ["_id", *(f.name for f in fields_of(collection))]
    one = st.builds(
        lambda changes, dropped: {
            k: v for k, v in ({**base, "_id": ObjectId()} | changes).items() if k not in dropped
        },
        st.one_of(st.just({}), st.dictionaries(st.sampled_from(names), field_values, max_size=1)),
        st.sets(st.sampled_from(names), max_size=1) | st.just(set()),
    )
    return st.lists(one, min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), collection=st.sampled_from(["tasks", "employee"]))
def test_a_batch_is_decoded_to_arrow_exactly_when_every_document_maps_with_the_same_rows(
    data: st.DataObject, collection: str
) -> None:
    docs = data.draw(_documents(collection))
    try:
        raw = b"".join(bson.encode(d) for d in docs)
    except (InvalidDocument, InvalidStringData, UnicodeEncodeError, OverflowError):
        assume(False)  # not storable in BSON: a NUL in a key, ... (invalid UTF-8: own test below)
    _, batch = _document_path(raw, collection)

    rows = decode_valid_rows(raw, collection, MAX_CHARS)

    event("some rejected" if batch.rejects else "all map")
    refused = [
        d for d in bson.decode_all(raw, AS_STORED) if contract_problems(d, collection, MAX_CHARS)
    ]
    assert [r.doc for r in batch.rejects] == refused  # the documented rules decide
    if batch.rejects:
        assert rows is None
    else:
        assert rows is not None
        table = with_bookkeeping(collection, rows, RUN_ID, LOADED_AT_MS)
        assert table.equals(to_arrow(batch, RUN_ID, LOADED_AT_MS))


def test_invalid_utf8_sends_the_batch_to_the_document_path_which_names_the_field() -> None:
    good = bson.encode(GOOD_TASK | {"_id": ObjectId()})
    bad = bson.encode(GOOD_TASK | {"employee_name": "ZZZZ"}).replace(b"ZZZZ", b"Z\xff\xfeZ")

    rows = decode_valid_rows(good + bad, "tasks", MAX_CHARS)

    assert rows is None
    _, batch = _document_path(good + bad, "tasks")
    assert batch.rows == 1
    assert "employee_name: invalid UTF-8" in batch.rejects[0].reason


def test_object_ids_become_hex_and_creation_seconds_also_from_a_slice() -> None:
    ids = [ObjectId() for _ in range(5)]
    storage = pa.array([oid.binary for oid in ids], pa.binary(12))

    hex_ids, created = object_id_columns(storage.slice(2, 3))

    assert hex_ids.to_pylist() == [str(oid) for oid in ids[2:]]
    assert created.to_pylist() == [oid.generation_time for oid in ids[2:]]
