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


@st.composite
def hostile_documents(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A collection and a good document of it, as read, with up to two fields (or `_id`) set to
    values that break one rule or another (or none) and up to one field dropped."""
    collection = draw(st.sampled_from(sorted(COLLECTION_FIELDS)))
    names = sorted({f.name for fs in COLLECTION_FIELDS.values() for f in fs} | {"_id"})
    changes = draw(st.dictionaries(st.sampled_from(names), field_values, max_size=2))
    dropped = draw(st.sets(st.sampled_from(sorted(GOOD_TASK) + sorted(GOOD_EMPLOYEE)), max_size=1))
    doc = _as_read(GOOD_TASK if collection == "tasks" else GOOD_EMPLOYEE) | changes
    for name in dropped:
        doc.pop(name, None)
    return collection, doc


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


def test_a_string_of_exactly_the_maximum_length_is_loaded() -> None:
    mapper = BatchMapper("tasks", 20)

    assert mapper.add(_as_read(GOOD_TASK) | {"employee_name": "x" * 20}) is True


def test_a_string_one_character_over_the_maximum_is_rejected_naming_the_field() -> None:
    mapper = BatchMapper("tasks", 20)

    assert mapper.add(_as_read(GOOD_TASK) | {"employee_name": "x" * 21}) is False
    assert mapper.take().rejects[0].reason.startswith("employee_name:")


def test_an_empty_file_id_is_rejected() -> None:
    mapper = BatchMapper("tasks", 20)

    assert mapper.add(_as_read(GOOD_TASK) | {"file_id": ""}) is False


def test_an_empty_employee_name_is_loaded() -> None:
    mapper = BatchMapper("tasks", 20)

    assert mapper.add(_as_read(GOOD_TASK) | {"employee_name": ""}) is True


@settings(max_examples=400, deadline=None)
@given(hostile_documents())
def test_fast_path_agrees_with_the_readable_rules(case: tuple[str, dict[str, Any]]) -> None:
    collection, doc = case
    mapper = BatchMapper(collection, 20)

    assert mapper.add(doc) is (not mapper.problems(doc))


@settings(max_examples=400, deadline=None)
@given(hostile_documents())
def test_the_mapper_rejects_exactly_what_the_documented_rules_refuse_naming_each_field(
    case: tuple[str, dict[str, Any]],
) -> None:
    collection, doc = case
    broken = contract_problems(doc, collection, max_string_chars=20)
    mapper = BatchMapper(collection, 20)

    loaded = mapper.add(doc)

    assert loaded is (not broken)
    if broken:
        reason = mapper.take().rejects[0].reason
        assert [f for f in broken if f"{f}:" not in reason] == []
