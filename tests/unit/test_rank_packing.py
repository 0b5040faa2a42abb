"""The rank of `pipeline_state_store` (macro `pipeline_state_rank`, macros/pipeline_state.sql),
without servers: the expression from the macro file, evaluated by the embedded engine in this
process. The store keeps, per file, the row with the highest rank, so the packed UInt256 must
order rows exactly like the tuple `(assigned_at, task_id, _version)` it packs."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import chdb
import jinja2

MACROS = Path(__file__).resolve().parents[2] / "macros" / "pipeline_state.sql"
Row = tuple[datetime, str, int]  # (assigned_at, task_id, _version)


def rank_expression() -> str:
    """The macro called with its default column names, rendered as dbt would (Jinja)."""
    text = MACROS.read_text()
    assert re.search(r"{%-?\s*macro pipeline_state_rank\(", text), (
        f"no macro pipeline_state_rank in {MACROS}"
    )
    env = jinja2.Environment(extensions=["jinja2.ext.do"])
    return env.from_string(text + "{{ pipeline_state_rank() }}").render().strip()


def ranked(rows: list[Row]) -> list[Row]:
    """`rows` from the lowest rank to the highest, as the engine orders them."""
    values = ", ".join(
        f"({n}, '{at:%Y-%m-%d %H:%M:%S.%f}', '{task_id}', {version})"
        for n, (at, task_id, version) in enumerate(rows)
    )
    sql = (
        f"SELECT n FROM (SELECT n, {rank_expression()} AS rank FROM values("
        "'n UInt32, assigned_at DateTime64(3, \\'UTC\\'), task_id String, _version UInt64', "
        f"{values})) ORDER BY rank"
    )
    order = [int(line) for line in chdb.query(sql, "CSV").bytes().decode().split()]
    return [rows[n] for n in order]


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


ID_LOW = "65a000000000000000000001"
ID_HIGH = "65a000000000000000000100"  # greater as a string, smaller in its last byte
NOON = at(2026, 1, 1, 12)


def test_a_later_assignment_outranks_a_greater_task_id_and_version() -> None:
    earlier = (NOON, "ffffffffffffffffffffffff", 2**64 - 1)
    later = (NOON + timedelta(milliseconds=1), "000000000000000000000000", 0)

    assert ranked([later, earlier]) == [earlier, later]


def test_at_the_same_time_the_greater_task_id_outranks_whatever_the_version() -> None:
    low, high = (NOON, ID_LOW, 2**64 - 1), (NOON, ID_HIGH, 1)

    assert ranked([high, low]) == [low, high]


def test_for_the_same_time_and_task_a_higher_version_outranks() -> None:
    old, new = (NOON, ID_LOW, 1_767_268_800_000), (NOON, ID_LOW, 1_767_268_800_001)

    assert ranked([new, old]) == [old, new]


def test_an_assignment_before_1970_ranks_below_a_later_one() -> None:
    old, recent = (at(1900, 1, 1), ID_HIGH, 5), (at(1970, 1, 1), ID_LOW, 1)

    assert ranked([recent, old]) == [old, recent]


def test_the_rank_orders_any_rows_like_the_tuple_it_packs() -> None:
    rng = random.Random(14)
    rows = [
        (
            at(1900, 1, 1) + timedelta(milliseconds=rng.choice([0, 1, 10**12, 4 * 10**12])),
            rng.choice([ID_LOW, ID_HIGH]) if rng.random() < 0.5 else f"{rng.getrandbits(96):024x}",
            rng.choice([0, 1, 2**63, 2**64 - 1]),
        )
        for _ in range(300)
    ]
    rows = list(dict.fromkeys(rows))  # equal tuples have no order to check

    assert ranked(rows) == sorted(rows)
