"""The watermark's read bounds (docs/ARCHITECTURE.md, "Watermark read bounds"), without servers.

With a stored `(W, id)` saved by a run that started reading at R, the next run reads
`(updated_at, _id) > (W, id)` when `W <= R - overlap`, else every `updated_at >= R - overlap`;
never past `now + LOADER_MAX_FUTURE_SECONDS`. What a sync reads with such a watermark stored is
checked against MongoDB in tests/loader/test_loader_watermark.py.
"""

from __future__ import annotations

from bson import MinKey, ObjectId
from bson.datetime_ms import DatetimeMS

from loader.mapping import MAX_DATETIME64_MS
from loader.watermark import MIN_BSON_DATE, ReadBounds, Watermark, read_bounds

OVERLAP_S = 60
FUTURE_S = 86_400
NOW = 1_767_268_800_000  # 2026-01-01T12:00:00Z, in ms
R = NOW - 3_600_000  # the previous run started reading an hour ago
WINDOW = R - OVERLAP_S * 1_000  # R - overlap
LAST_ID = "65a000000000000000000000"
UPPER = NOW + FUTURE_S * 1_000


def bounds_after(watermark_ms: int) -> ReadBounds:
    return read_bounds(Watermark(watermark_ms, LAST_ID, R), OVERLAP_S, FUTURE_S, NOW)


# -- read_bounds ----------------------------------------------------------------------------------
def test_without_a_watermark_everything_up_to_the_future_limit_is_read() -> None:
    assert read_bounds(None, OVERLAP_S, FUTURE_S, NOW) == ReadBounds(None, None, UPPER)


def test_a_watermark_exactly_at_r_minus_overlap_reads_strictly_after_it() -> None:
    assert bounds_after(WINDOW) == ReadBounds(WINDOW, ObjectId(LAST_ID), UPPER)


def test_a_watermark_one_ms_before_r_minus_overlap_reads_strictly_after_it() -> None:
    assert bounds_after(WINDOW - 1) == ReadBounds(WINDOW - 1, ObjectId(LAST_ID), UPPER)


def test_a_watermark_one_ms_inside_the_window_rereads_from_r_minus_overlap() -> None:
    assert bounds_after(WINDOW + 1) == ReadBounds(WINDOW, None, UPPER)


def test_a_wider_overlap_window_rereads_further_back() -> None:
    wm = Watermark(WINDOW, LAST_ID, R)

    assert read_bounds(wm, OVERLAP_S * 2, FUTURE_S, NOW).lower_ms == R - 2 * OVERLAP_S * 1_000


def test_the_upper_bound_follows_the_clock_not_the_watermark() -> None:
    later = NOW + 5_000

    assert read_bounds(Watermark(WINDOW, LAST_ID, R), OVERLAP_S, FUTURE_S, later).upper_ms == (
        later + FUTURE_S * 1_000
    )


# -- the MongoDB filter and index range of a read ------------------------------------------------
def test_reading_past_a_key_excludes_the_key_and_smaller_ids_at_its_time() -> None:
    bounds = ReadBounds(WINDOW, ObjectId(LAST_ID), UPPER)

    assert bounds.mongo_filter() == {
        "updated_at": {"$gte": DatetimeMS(WINDOW), "$lte": DatetimeMS(UPPER)},
        "$nor": [{"updated_at": DatetimeMS(WINDOW), "_id": {"$lte": ObjectId(LAST_ID)}}],
    }


def test_reading_from_a_time_without_an_id_includes_that_time() -> None:
    bounds = ReadBounds(WINDOW, None, UPPER)

    assert bounds.mongo_filter() == {
        "updated_at": {"$gte": DatetimeMS(WINDOW), "$lte": DatetimeMS(UPPER)}
    }


def test_reading_from_the_beginning_starts_at_the_lowest_bson_date() -> None:
    assert ReadBounds(None, None, UPPER).mongo_filter() == {
        "updated_at": {"$gte": MIN_BSON_DATE, "$lte": DatetimeMS(UPPER)}
    }


def test_the_index_scan_starts_at_the_watermarks_own_key() -> None:
    start, _ = ReadBounds(WINDOW, ObjectId(LAST_ID), UPPER).index_range()

    assert start == [("updated_at", DatetimeMS(WINDOW)), ("_id", ObjectId(LAST_ID))]


def test_the_index_scan_without_an_id_starts_before_every_id_at_its_time() -> None:
    start, _ = ReadBounds(WINDOW, None, UPPER).index_range()

    assert start == [("updated_at", DatetimeMS(WINDOW)), ("_id", MinKey())]


def test_the_index_scan_ends_past_every_document_at_the_upper_bound() -> None:
    _, end = ReadBounds(WINDOW, None, UPPER).index_range()

    assert end == [("updated_at", DatetimeMS(UPPER + 1)), ("_id", MinKey())]


# -- the stored watermark -------------------------------------------------------------------------
def test_a_watermark_keeps_the_id_of_its_document() -> None:
    assert Watermark.at(WINDOW, ObjectId(LAST_ID), R) == Watermark(WINDOW, LAST_ID, R)


def test_a_watermark_past_the_storable_range_is_clamped_and_drops_its_id() -> None:
    wm = Watermark.at(MAX_DATETIME64_MS + 1, ObjectId(LAST_ID), R)

    assert (wm.updated_at_ms, wm.last_id) == (MAX_DATETIME64_MS, "")


def test_a_stored_object_id_is_read_back_as_an_object_id() -> None:
    assert Watermark(WINDOW, LAST_ID, R).id_value() == ObjectId(LAST_ID)


def test_a_watermark_without_an_id_has_no_tie_break() -> None:
    assert Watermark(WINDOW, "", R).id_value() is None


def test_an_id_of_another_type_round_trips_through_the_stored_watermark() -> None:
    assert Watermark.at(WINDOW, "file-7", R).id_value() == "file-7"
