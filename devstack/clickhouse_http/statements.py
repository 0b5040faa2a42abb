"""What the front needs to know about a statement's text, without parsing SQL.

The engine parses every statement itself; the front only has to tell where an INSERT's data
starts, which output format a statement asks for, and whether it returns a result set (only
those get `X-ClickHouse-Format`, as ClickHouse sends it only for a pulling pipeline).
"""

from __future__ import annotations

import re

# `... FORMAT Name` at the end of a statement, possibly followed by a SETTINGS clause.
_FORMAT_RE = re.compile(
    r"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)\s*(?:SETTINGS\s+.*?)?;?\s*$", re.IGNORECASE | re.DOTALL
)
_INSERT_RE = re.compile(r"^\s*INSERT\s+INTO\b", re.IGNORECASE)
# An INSERT whose data follows the statement: "... FORMAT Name<ws>" or "... VALUES".
_INSERT_DATA = (
    r"^(?P<stmt>\s*INSERT\s+INTO\b.*?)\s*(?:\bFORMAT\s+(?P<fmt>[A-Za-z][A-Za-z0-9_]*)[ \t]*\r?\n?"
    r"|\b(?P<values>VALUES)\b)"
)
INSERT_DATA_RE = re.compile(_INSERT_DATA, re.IGNORECASE | re.DOTALL)
INSERT_DATA_RE_B = re.compile(_INSERT_DATA.encode(), re.IGNORECASE | re.DOTALL)
INSERT_RE_B = re.compile(_INSERT_RE.pattern.encode(), re.IGNORECASE)
_SET_RE = re.compile(r"^\s*SET\s+(?!ROLE\b|DEFAULT\s+ROLE\b)", re.IGNORECASE)
_USE_RE = re.compile(r"^\s*USE\s+\S+", re.IGNORECASE)
# Leading whitespace, comments and opening parentheses before a statement's first keyword.
_LEAD_RE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.DOTALL)
_WORD_RE = re.compile(r"[A-Za-z]+")
# Statements whose pipeline pulls a result (ASTQueryWithOutput that produce rows). DDL, INSERT,
# SET, USE, SYSTEM, OPTIMIZE, ... return nothing: ClickHouse sends them no X-ClickHouse-Format.
_RESULT_KEYWORDS = frozenset(
    {
        "SELECT",
        "WITH",
        "FROM",  # ClickHouse also takes `FROM t SELECT ...`
        "SHOW",
        "DESC",
        "DESCRIBE",
        "EXISTS",
        "EXPLAIN",
        "CHECK",
        "KILL",
        "WATCH",
        "BACKUP",
        "RESTORE",
    }
)


def is_insert(sql: str) -> bool:
    return bool(_INSERT_RE.match(sql))


def is_set(sql: str) -> bool:
    return bool(_SET_RE.match(sql))


def is_use(sql: str) -> bool:
    return bool(_USE_RE.match(sql))


def output_format(sql: str, default_format: str) -> str:
    """The format a statement's result is written in: its FORMAT clause, else the default."""
    match = _FORMAT_RE.search(sql)
    return match.group(1) if match else default_format


def without_format(sql: str) -> str:
    """The statement without its trailing `FORMAT Name` (to DESCRIBE it)."""
    match = _FORMAT_RE.search(sql)
    if match is None:
        return sql
    return sql[: match.start()] + sql[match.end(1) :]


def is_select(sql: str) -> bool:
    return first_keyword(sql) in ("SELECT", "WITH", "FROM")


def first_keyword(sql: str) -> str:
    lead = _LEAD_RE.match(sql)
    word = _WORD_RE.match(sql, lead.end() if lead else 0)
    return word.group(0).upper() if word else ""


def returns_result(sql: str) -> bool:
    """True for statements that answer with rows (and so with X-ClickHouse-Format)."""
    return first_keyword(sql) in _RESULT_KEYWORDS


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split at separators outside parentheses and quotes: `Enum('a,b' = 1), String`."""
    parts: list[str] = []
    depth, quote, start, i = 0, "", 0, 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'\"`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    parts.append(text[start:].strip())
    return [part for part in parts if part]


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
