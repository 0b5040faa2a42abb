"""Mapping rules, without servers: the mapper refuses exactly what the documented rules refuse
(the test-side classifier in tests/mongo_oracle.py), and its fast path and readable rules agree."""

from __future__ import annotations

from typing import Any

import bson
from bson.datetime_ms import DatetimeMS
from hypothesis import given, settings
from hypothesis import strategies as st
from mapping_cases import GOOD_EMPLOYEE, GOOD_TASK, field_values
from mongo_oracle import contract_problems

from loader.mapping import CODEC_OPTIONS, BatchMapper
from loader.schema import COLLECTION_FIELDS
from synthetic import MALFORMED_KINDS, corrupt


def _as_read(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as the loader receives it from the server."""
    return bson.decode(bson.encode(doc), CODEC_OPTIONS)


def test_good_task_maps_to_a_row_with_millisecond_dates() -> None:
    mapper = BatchMapper("tasks", 100)

    assert mapper.add(_as_read(GOOD_TASK)) is True
    batch = mapper.take()
    assert batch.columns["updated_at"] == [1764633600000]
    assert batch.columns["_id_created_at"] == [int(GOOD_TASK["_id"].generation_time.timestamp())]


def test_every_malformed_kind_but_non_ascii_is_rejected() -> None:
    mapper = BatchMapper("tasks", 65_536)

    accepted = {k for k in MALFORMED_KINDS if mapper.add(_as_read(corrupt(dict(GOOD_TASK), k)))}

    assert accepted == {"non_ascii"}


def test_updated_at_before_1970_is_rejected_because_it_is_the_version() -> None:
    mapper = BatchMapper("tasks", 100)
    doc = _as_read(GOOD_TASK) | {"updated_at": DatetimeMS(-1)}

    assert mapper.add(doc) is False
    assert "updated_at: date -1 ms" in mapper.take().rejects[0].reason


@settings(max_examples=400, deadline=None)
@given(
    collection=st.sampled_from(sorted(COLLECTION_FIELDS)),
    changes=st.dictionaries(
        st.sampled_from(
            sorted({f.name for fs in COLLECTION_FIELDS.values() for f in fs} | {"_id"})
        ),
        field_values,
        max_size=2,
    ),
    dropped=st.sets(st.sampled_from(sorted(GOOD_TASK) + sorted(GOOD_EMPLOYEE)), max_size=1),
)
def test_fast_path_agrees_with_the_readable_rules(
    collection: str, changes: dict[str, Any], dropped: set[str]
) -> None:
    base = GOOD_TASK if collection == "tasks" else GOOD_EMPLOYEE
    doc = _as_read(base) | changes
    for name in dropped:
        doc.pop(name, None)
    mapper = BatchMapper(collection, 20)

    assert mapper.add(doc) is (not mapper.problems(doc))


@settings(max_examples=400, deadline=None)
@given(
    collection=st.sampled_from(sorted(COLLECTION_FIELDS)),
    changes=st.dictionaries(
        st.sampled_from(
            sorted({f.name for fs in COLLECTION_FIELDS.values() for f in fs} | {"_id"})
        ),
        field_values,
        max_size=2,
    ),
    dropped=st.sets(st.sampled_from(sorted(GOOD_TASK) + sorted(GOOD_EMPLOYEE)), max_size=1),
)
def test_the_mapper_rejects_exactly_what_the_documented_rules_refuse_naming_each_field(
    collection: str, changes: dict[str, Any], dropped: set[str]
) -> None:
    base = GOOD_TASK if collection == "tasks" else GOOD_EMPLOYEE
    doc = _as_read(base) | changes
    for name in dropped:
        doc.pop(name, None)
    broken = contract_problems(doc, collection, max_string_chars=20)
    mapper = BatchMapper(collection, 20)

    loaded = mapper.add(doc)

    assert loaded is (not broken)
    if broken:
        reason = mapper.take().rejects[0].reason
        assert [f for f in broken if f"{f}:" not in reason] == []
