"""Document → row, or document → reject with a reason.

Rules (every mapped field must pass all of them, otherwise the whole document is rejected):
- `_id` is an ObjectId (the raw tables key on its hex form and partition on its timestamp).
- Every field of the collection (see `schema.COLLECTION_FIELDS`) is present and not null.
- Strings are strings, at most `Settings.max_string_chars` characters, without NUL characters
  (they break most downstream tools) and valid Unicode (invalid UTF-8 from the server is decoded
  with `surrogateescape` so that it reaches this check instead of aborting the whole batch).
  `file_id` (tasks) and `employee_code` (employee) must not be empty.
- Dates are BSON dates inside ClickHouse `DateTime64(3)`'s range (1900-01-01 .. 2299-12-31);
  `updated_at` must also be on or after 1970-01-01 because it becomes the unsigned `_version`.
- Booleans are BSON booleans.
A rejected document is kept in `raw.rejects` as canonical extended JSON (truncated past
`MAX_REJECT_DOCUMENT_CHARS`; a document that cannot even be serialised is stored as its repr).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bson import ObjectId, json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS

from loader.schema import ID_COLUMNS, Field, fields_of, raw_columns

if TYPE_CHECKING:  # pyarrow is imported where it is used: probing for changes needs none of it
    import pyarrow as pa

# Read dates as raw milliseconds: no datetime objects to build, no failure on dates Python's
# datetime cannot hold (those become rejects instead of aborting the cursor).
CODEC_OPTIONS: CodecOptions = CodecOptions(
    tz_aware=False,
    datetime_conversion=DatetimeConversion.DATETIME_MS,
    unicode_decode_error_handler="surrogateescape",
)

MIN_DATETIME64_MS = -2_208_988_800_000  # 1900-01-01T00:00:00Z
MAX_DATETIME64_MS = 10_413_791_999_999  # 2299-12-31T23:59:59.999Z
MAX_REJECT_DOCUMENT_CHARS = 1_000_000
NON_EMPTY: dict[str, frozenset[str]] = {
    "tasks": frozenset({"file_id"}),
    "employee": frozenset({"employee_code"}),
}
_JSON = json_util.CANONICAL_JSON_OPTIONS


def id_to_str(value: Any) -> str:
    """The `_id` as stored in ClickHouse: ObjectId hex, else extended JSON ('' when missing)."""
    if isinstance(value, ObjectId):
        return str(value)
    if value is None:
        return ""
    try:
        return json_util.dumps(value, json_options=_JSON)
    except Exception:  # noqa: BLE001 - an id we cannot print must still be recorded
        return repr(value)[:1000]


def dump_document(doc: Any) -> str:
    """Extended JSON of a document, never raising (falls back to repr), bounded in size."""
    try:
        text = json_util.dumps(doc, json_options=_JSON)
    except Exception as exc:  # noqa: BLE001 - any document must be storable as a reject
        try:
            text = f"<not serialisable as extended JSON: {exc}> {doc!r}"
        except Exception:  # noqa: BLE001
            text = f"<not serialisable as extended JSON: {exc}>"
    if len(text) > MAX_REJECT_DOCUMENT_CHARS:
        text = text[:MAX_REJECT_DOCUMENT_CHARS] + f"…<truncated, {len(text)} characters>"
    # Lone surrogates (from invalid UTF-8) cannot be sent as UTF-8; escape them visibly.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_string(name: str, value: Any, max_chars: int, non_empty: bool) -> str | None:
    if type(value) is not str:
        return f"{name}: expected a string, got {_type_name(value)}"
    if len(value) > max_chars:
        return f"{name}: string of {len(value)} characters exceeds the limit of {max_chars}"
    if non_empty and not value:
        return f"{name}: must not be empty"
    if "\x00" in value:
        return f"{name}: contains a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{name}: invalid UTF-8 / lone surrogate"
    return None


def min_date_ms(name: str) -> int:
    """Earliest date field `name` may hold: `updated_at` becomes the unsigned `_version`."""
    return 0 if name == "updated_at" else MIN_DATETIME64_MS


def check_datetime(name: str, value: Any, min_ms: int) -> str | None:
    if type(value) is not DatetimeMS:
        return f"{name}: expected a date, got {_type_name(value)}"
    ms = int(value)
    if not min_ms <= ms <= MAX_DATETIME64_MS:
        return f"{name}: date {ms} ms since epoch is outside the storable range"
    return None


@dataclass
class Reject:
    id: Any
    reason: str
    doc: Any = None  # the document as read (projected)


@dataclass
class MappedBatch:
    """One batch in columnar form plus its rejects."""

    collection: str
    columns: dict[str, list[Any]]
    rejects: list[Reject] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.columns["_id"])


class BatchMapper:
    """Validates documents of one collection and accumulates valid ones column by column."""

    def __init__(self, collection: str, max_string_chars: int) -> None:
        self.collection = collection
        self.fields: tuple[Field, ...] = fields_of(collection)
        self.max_string_chars = max_string_chars
        self.non_empty = NON_EMPTY.get(collection, frozenset())
        self._spec = [
            (f.name, f.kind, min_date_ms(f.name), f.name in self.non_empty) for f in self.fields
        ]
        self.reset()

    def reset(self) -> None:
        names = [n for n, _ in ID_COLUMNS] + [f.name for f in self.fields]
        self._cols: dict[str, list[Any]] = {n: [] for n in names}
        self._field_columns = [self._cols[f.name] for f in self.fields]
        self._rejects: list[Reject] = []

    def problems(self, doc: dict[str, Any]) -> list[str]:
        """Every rule `doc` breaks; empty when it maps."""
        out: list[str] = []
        if type(doc.get("_id")) is not ObjectId:
            out.append(f"_id: expected an ObjectId, got {_type_name(doc.get('_id'))}")
        for f in self.fields:
            if f.name not in doc:
                out.append(f"{f.name}: missing")
                continue
            value = doc[f.name]
            if value is None:
                out.append(f"{f.name}: null")
                continue
            if f.kind == "str":
                problem = check_string(
                    f.name, value, self.max_string_chars, f.name in self.non_empty
                )
            elif f.kind == "datetime":
                problem = check_datetime(f.name, value, min_date_ms(f.name))
            elif type(value) is not bool:
                problem = f"{f.name}: expected a boolean, got {_type_name(value)}"
            else:
                problem = None
            if problem:
                out.append(problem)
        return out

    def add(self, doc: dict[str, Any]) -> bool:
        """Map one document; True when it became a row, False when rejected.

        The hot path: one pass that checks and converts each value, with `problems` (the
        readable version of the same rules) consulted only for documents that fail."""
        oid: Any = doc.get("_id")  # an ObjectId wherever `ok` holds
        values: list[Any] = []
        ok = type(oid) is ObjectId
        if ok:
            max_chars = self.max_string_chars
            for name, kind, min_ms, non_empty in self._spec:
                v = doc.get(name)
                if kind == "str":
                    if (
                        type(v) is not str
                        or len(v) > max_chars
                        or (non_empty and not v)
                        or "\x00" in v
                        or (not v.isascii() and not _is_utf8(v))
                    ):
                        ok = False
                        break
                    values.append(v)
                elif kind == "datetime":
                    if type(v) is not DatetimeMS:
                        ok = False
                        break
                    ms = int(v)
                    if ms < min_ms or ms > MAX_DATETIME64_MS:
                        ok = False
                        break
                    values.append(ms)
                else:
                    if type(v) is not bool:
                        ok = False
                        break
                    values.append(1 if v else 0)
        if not ok:
            self._rejects.append(Reject(oid, "; ".join(self.problems(doc)), doc))
            return False
        cols = self._cols
        cols["_id"].append(str(oid))
        cols["_id_created_at"].append(int.from_bytes(oid.binary[:4], "big"))
        for column, value in zip(self._field_columns, values, strict=True):
            column.append(value)
        return True

    def take(self) -> MappedBatch:
        """Hand over the accumulated batch and start a new one."""
        batch = MappedBatch(self.collection, self._cols, self._rejects)
        self.reset()
        return batch


def _arrow_type(ch_type: str) -> pa.DataType:
    import pyarrow as pa

    if ch_type.startswith("DateTime64"):
        return pa.timestamp("ms", tz="UTC")
    if ch_type.startswith("DateTime"):
        return pa.timestamp("s", tz="UTC")
    if ch_type == "UInt8":
        return pa.uint8()
    if ch_type == "UInt64":
        return pa.uint64()
    return pa.string()


def bookkeeping_arrays(
    version: pa.Array | pa.ChunkedArray, run_id: str, loaded_at_ms: int
) -> dict[str, pa.Array | pa.ChunkedArray]:
    """The bookkeeping columns (`schema.BOOKKEEPING`) of rows whose `_version` is `version`."""
    import pyarrow as pa

    n = len(version)
    return {
        "_version": version,
        "is_deleted": pa.repeat(pa.scalar(0, pa.uint8()), n),
        "_loaded_at": pa.repeat(pa.scalar(loaded_at_ms, pa.timestamp("ms", tz="UTC")), n),
        "_run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
    }


def with_bookkeeping(
    collection: str, columns: dict[str, pa.Array | pa.ChunkedArray], run_id: str, loaded_at_ms: int
) -> pa.Table:
    """`ID_COLUMNS` + field columns → a table in `raw.<collection>` column order, with the
    bookkeeping columns filled in (`_version` is `updated_at` in milliseconds)."""
    import pyarrow as pa

    version = columns["updated_at"].cast(pa.int64()).cast(pa.uint64())
    known = columns | bookkeeping_arrays(version, run_id, loaded_at_ms)
    return pa.table({name: known[name] for name, _ in raw_columns(collection)})


def to_arrow(batch: MappedBatch, run_id: str, loaded_at_ms: int) -> pa.Table:
    """The batch as an Arrow table in `raw.<collection>` column order (bookkeeping filled in)."""
    import pyarrow as pa

    types = dict(raw_columns(batch.collection))
    columns = {
        name: pa.array(values, _arrow_type(types[name])) for name, values in batch.columns.items()
    }
    return with_bookkeeping(batch.collection, columns, run_id, loaded_at_ms)
