"""Documents for the mapping tests: one good document per collection, and hostile values."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from bson.datetime_ms import DatetimeMS
from hypothesis import strategies as st

from loader.mapping import MAX_DATETIME64_MS

GOOD_TASK: dict[str, Any] = {
    "_id": ObjectId("6949f9808bb6605dda000000"),
    "file_id": "F0-00000001",
    "stage": "review",
    "employee_code": "E00001",
    "employee_name": "Ana Rossi",
    "status": "in_progress",
    "assigned_at": datetime(2025, 12, 1, tzinfo=UTC),
    "updated_at": datetime(2025, 12, 2, tzinfo=UTC),
}

GOOD_EMPLOYEE: dict[str, Any] = {
    "_id": ObjectId("68b2c64095d9622df1000000"),
    "employee_code": "E00001",
    "employee_name": "Zoë Ñúñez",
    "team": "north",
    "active": True,
    "updated_at": datetime(2025, 9, 1, tzinfo=UTC),
}

# Values that break one rule or another (or none), for any field.
field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=5).map(lambda s: s + "\x00"),
    st.integers(-(2**62), MAX_DATETIME64_MS + 10**6).map(DatetimeMS),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just("\udcff bad"),
)
