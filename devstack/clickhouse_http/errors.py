"""Errors as ClickHouse reports them: `Code: N. DB::Exception: <text>. (NAME)`, and their status.

Every failure the front answers with is a `ClickHouseError`: the engine's own errors keep their
code and text; errors the front raises itself use the code ClickHouse uses for the same case.
"""

from __future__ import annotations

import re

# The codes the front raises itself (src/Common/ErrorCodes.cpp).
BAD_ARGUMENTS = 36
NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
UNKNOWN_FORMAT = 73
UNKNOWN_SETTING = 115
TOO_MANY_SIMULTANEOUS_QUERIES = 202
CANNOT_DECOMPRESS = 271
SESSION_NOT_FOUND = 372
SESSION_IS_LOCKED = 373
INVALID_SESSION_TIMEOUT = 374
QUERY_WAS_CANCELLED = 394
AUTHENTICATION_FAILED = 516
POCO_EXCEPTION = 1000
STD_EXCEPTION = 1001

# ClickHouse's mapping from error code to HTTP status
# (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp); every other code is a 500.
_STATUS_BY_CODE = {
    **dict.fromkeys((194,), 401),  # REQUIRED_PASSWORD
    # UNKNOWN_USER, WRONG_PASSWORD, AUTHENTICATION_FAILED, SET_NON_GRANTED_ROLE, ACCESS_DENIED
    **dict.fromkeys((192, 193, 516, 512, 497), 403),
    # BAD_ARGUMENTS, CANNOT_COMPILE_REGEXP, CANNOT_PARSE_{TEXT, ESCAPE_SEQUENCE, QUOTED_STRING,
    # DATE, DATETIME, NUMBER, DOMAIN_VALUE_FROM_STRING, IPV4, IPV6, INPUT_ASSERTION_FAILED, UUID},
    # DUPLICATE_COLUMN, ILLEGAL_COLUMN, UNKNOWN_ELEMENT_IN_AST, UNKNOWN_TYPE_OF_AST_NODE,
    # THERE_IS_NO_COLUMN, TOO_DEEP_AST, TOO_BIG_AST, UNEXPECTED_AST_STRUCTURE, SYNTAX_ERROR,
    # INCORRECT_DATA, TYPE_MISMATCH, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    **dict.fromkeys(
        (36, 427, 6, 25, 26, 38, 41, 72, 441, 675, 676, 27, 376)
        + (15, 44, 37, 123, 8, 167, 168, 223, 62, 117, 53, 321),
        400,
    ),
    # UNKNOWN_{TABLE, FUNCTION, IDENTIFIER, TYPE, STORAGE, DATABASE, SETTING,
    # DIRECTION_OF_SORTING, AGGREGATE_FUNCTION, FORMAT, DATABASE_ENGINE, TYPE_OF_QUERY, ROLE}
    **dict.fromkeys((60, 46, 47, 50, 56, 81, 115, 152, 63, 73, 336, 78, 511), 404),
    229: 413,  # QUERY_IS_TOO_LARGE
    48: 501,  # NOT_IMPLEMENTED
    209: 503,  # SOCKET_TIMEOUT
    76: 503,  # CANNOT_OPEN_FILE
    439: 503,  # CANNOT_SCHEDULE_TASK
    381: 411,  # HTTP_LENGTH_REQUIRED
    159: 408,  # TIMEOUT_EXCEEDED
    779: 415,  # UNSUPPORTED_MEDIA_TYPE
}


def http_status(code: int) -> int:
    return _STATUS_BY_CODE.get(code, 500)


_CODE_RE = re.compile(r"Code: (\d+)\. ")
# "Code: 73. DB::Exception: Code: 73. DB::Exception: msg (version v). (NAME)" -> inner message
_NESTED_RE = re.compile(
    r"^Code: \d+\. DB::Exception: (Code: \d+\. DB::Exception: .*)"
    r" \(version [^)]*\)\. \([A-Z_0-9]+\)$",
    re.DOTALL,
)


class ClickHouseError(Exception):
    """An error reported the way ClickHouse does: `Code: N. DB::Exception: ...`."""

    def __init__(self, code: int, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or http_status(code)

    @classmethod
    def of(cls, code: int, name: str, text: str) -> ClickHouseError:
        """An error the front raises itself, worded like the engine's."""
        return cls(code, f"Code: {code}. DB::Exception: {text}. ({name})")

    @classmethod
    def from_exception(cls, exc: BaseException) -> ClickHouseError:
        if isinstance(exc, ClickHouseError):
            return exc
        text = str(exc)
        match = _CODE_RE.search(text)
        if match:  # chdb wraps the engine's text in prefixes like "Streaming query failed: "
            message = text[match.start() :]
            while nested := _NESTED_RE.match(message):  # and sometimes in itself, repeatedly
                message = nested.group(1)
            return cls(int(match.group(1)), message)
        return cls(STD_EXCEPTION, f"Code: 1001. DB::Exception: {text}. (STD_EXCEPTION)")

    @classmethod
    def bad_request(cls, text: str) -> ClickHouseError:
        return cls.of(BAD_ARGUMENTS, "BAD_ARGUMENTS", text)

    @classmethod
    def form_limit(cls, problem: str) -> ClickHouseError:
        """A URL parameter or form field over a limit (see limits.py): code 1000, status 500."""
        text = f"Poco::Exception. Code: 1000, e.code() = 0, HTML Form Exception: {problem}"
        return cls(POCO_EXCEPTION, text)
