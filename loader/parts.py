"""`I/N` worker specs: shard I of N (`--shard`, `loader.shards`) and range k of N (`--range`,
`loader.snapshot_ranges`) are parsed and checked the same way, with errors naming the option."""

from __future__ import annotations

import re

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def check_part(index: int, count: int, noun: str, error: type[ValueError]) -> None:
    """Raise `error` unless 0 <= index < count (parts of N are numbered 0 to N-1)."""
    if count < 1 or not 0 <= index < count:
        raise error(
            f"{noun} {index}/{count} does not exist: {noun}s of N are numbered 0 to N-1 "
            f"(for 4 workers run --{noun} 0/4, 1/4, 2/4 and 3/4)"
        )


def parse_part(spec: str, noun: str, letter: str, error: type[ValueError]) -> tuple[int, int]:
    """`"I/N"` → `(I, N)`; `error` naming the option `--<noun>` and the form otherwise."""
    match = _SPEC.match(spec)
    if not match:
        raise error(
            f"--{noun} {spec!r} is not of the form {letter}/N "
            f"({noun} {letter} of N, 0 <= {letter} < N, e.g. 0/4)"
        )
    index, count = int(match.group(1)), int(match.group(2))
    check_part(index, count, noun, error)
    return index, count
