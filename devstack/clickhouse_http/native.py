"""Native output as a client that sends `client_protocol_version` expects it.

ClickHouse writes Native for the revision the client names (src/Formats/NativeWriter.cpp); chdb
always writes it for revision 0. The differences, applied here block by block:

- revision > 0: every block starts with its BlockInfo (is_overflows = 0, bucket_num = -1);
- revision < 54337 hides the time zone of a top-level `DateTime('Zone')` column type (it is
  written as plain `DateTime`); from 54337 on the type keeps its zone, so the client reads the
  values in the right zone. The zones come from the statement's own column types
  (`DESCRIBE`), since a revision-0 block no longer has them; the handler asks for them only
  when a result's first block has such a column (`wants_column_types`): a DESCRIBE plans the
  statement a second time;
- revision >= 54454: each column type is followed by a "custom serialization" flag (0: chdb's
  revision-0 output never uses sparse columns).

To find the column types after the first, and where a block ends, the column data is skipped
by the layout of its type. Types without a fixed documented layout (AggregateFunction, Dynamic,
Variant, JSON, Object) cannot be skipped: a block holding one gets its BlockInfo, and its
columns up to that one their zones and flags; the rest is passed on as chdb wrote it.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from devstack.clickhouse_http.statements import split_top_level

log = logging.getLogger("devstack.clickhouse_http")

REVISION_WITH_TIME_ZONE_IN_DATETIME = 54337  # DBMS_MIN_REVISION_WITH_TIME_ZONE_PARAMETER_...
REVISION_WITH_CUSTOM_SERIALIZATION = 54454  # DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION
# BlockInfo: field 1 is_overflows (UInt8 0), field 2 bucket_num (Int32 -1), field 0 = end.
BLOCK_INFO = b"\x01\x00\x02\xff\xff\xff\xff\x00"

_FIXED_SIZES = {
    **dict.fromkeys(("UInt8", "Int8", "Bool", "Enum8", "Nothing"), 1),
    **dict.fromkeys(("UInt16", "Int16", "Date", "Enum16", "BFloat16"), 2),
    **dict.fromkeys(("UInt32", "Int32", "Float32", "Date32", "DateTime", "IPv4", "Time"), 4),
    **dict.fromkeys(("UInt64", "Int64", "Float64", "DateTime64", "Time64"), 8),
    **dict.fromkeys(("UInt128", "Int128", "UUID", "IPv6"), 16),
    **dict.fromkeys(("UInt256", "Int256"), 32),
    "Decimal32": 4,
    "Decimal64": 8,
    "Decimal128": 16,
    "Decimal256": 32,
}
_GEO = {
    "Point": "Tuple(Float64, Float64)",
    "Ring": "Array(Point)",
    "LineString": "Array(Point)",
    "Polygon": "Array(Ring)",
    "MultiLineString": "Array(LineString)",
    "MultiPolygon": "Array(Polygon)",
}


class UnknownLayout(Exception):
    """A column type whose Native layout this module cannot skip."""


@dataclass(frozen=True)
class Type:
    name: str
    args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Type:
        text = text.strip()
        if "(" not in text:
            return cls(text)
        name, _, rest = text.partition("(")
        if not rest.endswith(")"):
            raise UnknownLayout(text)
        return cls(name.strip(), tuple(split_top_level(rest[:-1])))

    def arg_type(self, i: int) -> Type:
        return Type.parse(self.args[i])

    def element_types(self) -> list[Type]:
        """A Tuple's element types, without their names (`Tuple(a UInt8, b String)`)."""
        return [Type.parse(_strip_element_name(arg)) for arg in self.args]


def _strip_element_name(element: str) -> str:
    if element.startswith("`"):
        return element[element.index("`", 1) + 1 :].strip()
    head, _, rest = element.partition(" ")
    if rest and "(" not in head and head.isidentifier():
        return rest
    return element


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def varint(self) -> int:
        result = shift = 0
        while True:
            if self.pos >= len(self.data):
                raise UnknownLayout("truncated block")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def string(self) -> bytes:
        size = self.varint()
        return self.take(size)

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise UnknownLayout("truncated block")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def uint64(self) -> int:
        return int(struct.unpack_from("<Q", self.take(8))[0])


def _skip_prefix(reader: _Reader, type_: Type) -> None:
    """The per-column state written before the data (serializeBinaryBulkStatePrefix)."""
    name = type_.name
    if name == "LowCardinality":
        reader.take(8)  # key version
    elif name in ("Array", "Nullable"):
        _skip_prefix(reader, type_.arg_type(0))
    elif name == "Tuple":
        for element in type_.element_types():
            _skip_prefix(reader, element)
    elif name == "Map":
        _skip_prefix(reader, Type("Tuple", type_.args))
    elif name == "SimpleAggregateFunction":
        _skip_prefix(reader, type_.arg_type(1))
    elif name in _GEO:
        _skip_prefix(reader, Type.parse(_GEO[name]))


def _skip_data(reader: _Reader, type_: Type, rows: int) -> None:
    name = type_.name
    if name in _FIXED_SIZES:
        reader.take(_FIXED_SIZES[name] * rows)
    elif name.startswith("Interval"):
        reader.take(8 * rows)
    elif name == "Decimal":
        precision = int(type_.args[0])
        size = 4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32
        reader.take(size * rows)
    elif name == "FixedString":
        reader.take(int(type_.args[0]) * rows)
    elif name == "String":
        for _ in range(rows):
            reader.string()
    elif name == "Nullable":
        reader.take(rows)  # null map
        _skip_data(reader, type_.arg_type(0), rows)
    elif name == "Array":
        offsets_end = 0
        for _ in range(rows):
            offsets_end = reader.uint64()
        _skip_data(reader, type_.arg_type(0), offsets_end)
    elif name == "Tuple":
        for element in type_.element_types():
            _skip_data(reader, element, rows)
    elif name == "Map":
        _skip_data(reader, Type("Array", (f"Tuple({', '.join(type_.args)})",)), rows)
    elif name == "LowCardinality":
        _skip_low_cardinality(reader, type_.arg_type(0), rows)
    elif name == "SimpleAggregateFunction":
        _skip_data(reader, type_.arg_type(1), rows)
    elif name in _GEO:
        _skip_data(reader, Type.parse(_GEO[name]), rows)
    else:
        raise UnknownLayout(name)


_NEED_GLOBAL_DICTIONARY = 1 << 8
_HAS_ADDITIONAL_KEYS = 1 << 9
_INDEX_SIZES = (1, 2, 4, 8)


def _skip_low_cardinality(reader: _Reader, inner: Type, rows: int) -> None:
    """SerializationLowCardinality: flags, the block's keys, then one index per row."""
    if rows == 0:
        return
    flags = reader.uint64()
    if flags & _NEED_GLOBAL_DICTIONARY:
        raise UnknownLayout("LowCardinality with a global dictionary")
    if flags & _HAS_ADDITIONAL_KEYS:
        keys = reader.uint64()
        dictionary = inner.arg_type(0) if inner.name == "Nullable" else inner
        _skip_data(reader, dictionary, keys)
    indexes = reader.uint64()
    reader.take(_INDEX_SIZES[flags & 0xFF] * indexes)


def _encode_string(value: bytes) -> bytes:
    out = bytearray()
    size = len(value)
    while size >= 0x80:
        out.append((size & 0x7F) | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out) + value


class NativeUpgrade:
    """Rewrites chdb's revision-0 Native blocks for a client's `client_protocol_version`."""

    def __init__(self, client_protocol_version: int, column_types: list[str] | None = None) -> None:
        self.revision = client_protocol_version
        # The statement's column types with their zones (DESCRIBE); None when unknown.
        self.column_types = column_types
        self._warned = False

    def wants_column_types(self, first_block: bytes) -> bool:
        """Whether the statement's column types are needed to rewrite its result, judged on its
        first block: a top-level `DateTime` column hides a zone this revision shows (also when
        the block cannot be read up to its last column)."""
        if self.revision < REVISION_WITH_TIME_ZONE_IN_DATETIME or self.column_types is not None:
            return False
        try:
            reader = _Reader(first_block)
            columns = reader.varint()
            rows = reader.varint()
            for _ in range(columns):
                reader.string()
                written_type = reader.string().decode()
                if written_type == "DateTime":
                    return True
                if rows:
                    type_ = Type.parse(written_type)
                    _skip_prefix(reader, type_)
                    _skip_data(reader, type_, rows)
        except UnknownLayout:
            return True
        return False

    def blocks(self, data: bytes) -> bytes:
        """Rewrite every block in `data` (a streamed chunk is one block, a whole result many)."""
        if self.revision <= 0 or not data:
            return data
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            try:
                piece, pos = self._block(data, pos)
            except UnknownLayout as exc:
                self._warn(exc)
                out.append(BLOCK_INFO + data[pos:])  # as chdb wrote it, from here on
                break
            out.append(piece)
        return b"".join(out)

    def _block(self, data: bytes, start: int) -> tuple[bytes, int]:
        reader = _Reader(data, start)
        columns = reader.varint()
        rows = reader.varint()
        out = [BLOCK_INFO, data[start : reader.pos]]
        for i in range(columns):
            name = reader.string()
            written_type = reader.string().decode()
            out.append(_encode_string(name) + _encode_string(self._type_for(i, written_type)))
            if self.revision >= REVISION_WITH_CUSTOM_SERIALIZATION:
                out.append(b"\x00")  # no custom (sparse) serialization
            data_start = reader.pos
            if rows:  # zero rows are written as zero bytes of data
                type_ = Type.parse(written_type)
                _skip_prefix(reader, type_)
                _skip_data(reader, type_, rows)
            out.append(data[data_start : reader.pos])
        return b"".join(out), reader.pos

    def _type_for(self, index: int, written: str) -> bytes:
        """The type name the client's revision gets: `DateTime` regains its zone."""
        real = self.column_types[index] if self.column_types else None
        if (
            written == "DateTime"
            and real is not None
            and real.startswith("DateTime(")
            and self.revision >= REVISION_WITH_TIME_ZONE_IN_DATETIME
        ):
            return real.encode()
        return written.encode()

    def _warn(self, exc: UnknownLayout) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "Native output for client_protocol_version %d: cannot skip a column of type %s; "
                "the rest of the block is sent as the engine wrote it",
                self.revision,
                exc,
            )
