"""ClickHouse's limits on the size of a request, at their defaults, answered as ClickHouse does.

The settings (src/Core/Settings.cpp) and what happens over them; a size equal to a limit is
accepted, one byte more is not, and sizes are counted as sent (percent-encoded):

- The request line and headers (src/Server/HTTP/HTTPServerRequest.cpp, ReadHeaders.cpp): over a
  limit, Poco throws a MessageException ("HTTP request URI invalid or too long", "Too many header
  fields", "Field name is too long", "Field value is too long") that HTTPServerConnection.cpp
  answers with a bare `400 Bad Request`: no body, no X-ClickHouse-Exception-Code,
  `Connection: close`. The reason is only logged. -> `RequestHeadLimits`.
- URL parameters and multipart form fields (src/Server/HTTP/HTMLForm.cpp, same settings): an
  HTMLFormException ("Too many form fields", "Field name too long", "Field value too long") that
  the query handler reports as an error: status 500, X-ClickHouse-Exception-Code 1000
  (POCO_EXCEPTION), body "Poco::Exception. Code: 1000, e.code() = 0, HTML Form Exception: ...".
  So one `param_x` longer than 128 KiB is refused even when the whole URL is under 1 MiB.
  -> `check_form_limits`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from devstack.clickhouse_http.errors import ClickHouseError

log = logging.getLogger("devstack.clickhouse_http")

HTTP_MAX_URI_SIZE = 1 << 20  # http_max_uri_size
HTTP_MAX_FIELDS = 1_000_000  # http_max_fields
HTTP_MAX_FIELD_NAME_SIZE = 128 << 10  # http_max_field_name_size
HTTP_MAX_FIELD_VALUE_SIZE = 128 << 10  # http_max_field_value_size
# h11 buffers a request's head until it is complete; its default (16 KiB) refused URLs that
# ClickHouse takes. This leaves room for a maximal URI plus 1 MiB of headers, so requests within
# the limits reach RequestHeadLimits and one connection holds at most ~2 MiB of head. A larger
# head (ClickHouse would read up to 1,000,000 headers of 128 KiB) is cut off by h11 itself:
# uvicorn answers 400 "Invalid HTTP request received." and closes, much as ClickHouse would.
H11_MAX_INCOMPLETE_EVENT_SIZE = HTTP_MAX_URI_SIZE + (1 << 20)


class RequestHeadLimits:
    """ASGI middleware: ClickHouse's limits on the request line and headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = head_problem(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        log.info("refused a request: %s", problem)  # ClickHouse, too, only logs the reason
        headers = [(b"content-length", b"0"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def head_problem(scope: Scope) -> str | None:
    query: bytes = scope["query_string"]
    uri_size = len(scope["raw_path"]) + (1 + len(query) if query else 0)
    if uri_size > HTTP_MAX_URI_SIZE:
        return "HTTP request URI invalid or too long"
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    if len(headers) > HTTP_MAX_FIELDS:
        return "Too many header fields"
    for name, value in headers:
        if len(name) > HTTP_MAX_FIELD_NAME_SIZE:
            return "Field name is too long"
        if len(value) > HTTP_MAX_FIELD_VALUE_SIZE:
            return "Field value is too long"
    return None


def check_form_limits(fields: Iterable[tuple[bytes | str, bytes]]) -> None:
    """ClickHouse's limits on URL parameters or multipart form fields, as sent."""
    for count, (name, value) in enumerate(fields, 1):
        if count > HTTP_MAX_FIELDS:
            raise ClickHouseError.form_limit("Too many form fields")
        if len(name) > HTTP_MAX_FIELD_NAME_SIZE:
            raise ClickHouseError.form_limit("Field name too long")
        if len(value) > HTTP_MAX_FIELD_VALUE_SIZE:
            raise ClickHouseError.form_limit("Field value too long")


def check_url_limits(raw_query: bytes) -> None:
    """The URL's parameters, checked as sent (before authentication, like ClickHouse's HTMLForm)."""
    if raw_query:
        fields = (field.partition(b"=") for field in raw_query.split(b"&"))
        check_form_limits((name, value) for name, _, value in fields)
