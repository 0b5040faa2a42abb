"""What the front answers, compared with what ClickHouse documents: headers, request bodies as
bytes, query parameters in INSERT ... VALUES, external data, and Native output for clients that
send `client_protocol_version`.

Requests are the ones real clients send: clickhouse-connect's own calls, and raw HTTP (httpx)
where the headers and bytes themselves are the point.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
import zoneinfo

import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.external import ExternalData
from clickhouse_connect.driver.summary import QuerySummary
from clickhouse_fronts import Front

from devstack.clickhouse_http.native import REVISION_WITH_TIME_ZONE_IN_DATETIME, NativeUpgrade

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def post(front: Front, body: bytes, **params: str) -> httpx.Response:
    return httpx.post(front.url, params=params, content=body, timeout=60)


def table(front: Front, columns: str) -> str:
    name = f"t_{uuid.uuid4().hex[:8]}"
    post(front, f"CREATE TABLE {name} ({columns}) ENGINE = Memory".encode())
    return name


# --- response headers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE IF NOT EXISTS no_result (a UInt8) ENGINE = Memory",
        "SET max_threads = 1",
        "DROP TABLE IF EXISTS no_result_at_all",
        "INSERT INTO no_result VALUES (1)",
    ],
    ids=["create", "set", "drop", "insert"],
)
def test_statement_without_result_gets_no_format_header(front: Front, statement: str) -> None:
    # ClickHouse sends X-ClickHouse-Format (and the format's Content-Type) only for a statement
    # whose pipeline returns rows (executeQuery: `pipeline.pulling()`).
    post(front, b"CREATE TABLE IF NOT EXISTS no_result (a UInt8) ENGINE = Memory")
    response = post(front, statement.encode())
    assert response.status_code == 200, response.text
    assert "X-ClickHouse-Format" not in response.headers
    assert response.headers["Content-Type"] == "text/plain; charset=UTF-8"
    assert "X-ClickHouse-Summary" in response.headers


@pytest.mark.parametrize(
    ("query", "fmt", "content_type"),
    [
        ("SELECT 1", "TabSeparated", "text/tab-separated-values; charset=UTF-8"),
        ("SELECT 1 FORMAT JSON", "JSON", "application/json; charset=UTF-8"),
        ("SHOW DATABASES", "TabSeparated", "text/tab-separated-values; charset=UTF-8"),
        ("SELECT 1 FORMAT Native", "Native", "application/octet-stream"),
    ],
)
def test_result_gets_its_format_and_content_type(
    front: Front, query: str, fmt: str, content_type: str
) -> None:
    response = post(front, query.encode())
    assert response.headers["X-ClickHouse-Format"] == fmt
    assert response.headers["Content-Type"] == content_type


def test_command_that_returns_nothing_gives_clickhouse_connect_its_summary(front: Front) -> None:
    client = front.client()
    name = table(front, "a UInt8")
    summary = client.command(f"INSERT INTO {name} SELECT number FROM numbers(5)")
    assert isinstance(summary, QuerySummary)
    assert summary.written_rows == 5
    assert isinstance(client.command("DROP TABLE IF EXISTS not_there"), QuerySummary)
    assert client.command("SELECT count() FROM system.one") == 1


def test_query_id_is_generated_when_the_client_sends_none(front: Front) -> None:
    first = post(front, b"SELECT 1").headers["X-ClickHouse-Query-Id"]
    second = post(front, b"SELECT 1").headers["X-ClickHouse-Query-Id"]
    assert UUID_RE.match(first) and UUID_RE.match(second)
    assert first != second


def test_query_id_comes_from_the_url_or_the_header(front: Front) -> None:
    assert post(front, b"SELECT 1", query_id="from-url").headers["X-ClickHouse-Query-Id"] == (
        "from-url"
    )
    response = httpx.post(
        front.url, content=b"SELECT 1", headers={"X-ClickHouse-Query-Id": "from-header"}
    )
    assert response.headers["X-ClickHouse-Query-Id"] == "from-header"


def test_timezone_header_is_the_session_timezone_in_effect(front: Front) -> None:
    server_tz = post(front, b"SELECT timezone()").text.strip()
    assert post(front, b"SELECT 1").headers["X-ClickHouse-Timezone"] == server_tz
    tokyo = post(front, b"SELECT 1", session_timezone="Asia/Tokyo")
    assert tokyo.headers["X-ClickHouse-Timezone"] == "Asia/Tokyo"
    session = f"tz-{uuid.uuid4().hex}"
    post(front, b"SET session_timezone = 'America/Denver'", session_id=session)
    later = post(front, b"SELECT 1", session_id=session)
    assert later.headers["X-ClickHouse-Timezone"] == "America/Denver"


def test_summary_counts_the_rows_an_insert_wrote(front: Front) -> None:
    name = table(front, "a UInt32")
    response = post(front, b"1\n2\n3\n", query=f"INSERT INTO {name} FORMAT TSV")
    summary = json.loads(response.headers["X-ClickHouse-Summary"])
    assert summary["written_rows"] == "3"
    assert set(summary) >= {"read_rows", "read_bytes", "written_bytes", "result_rows"}


def test_error_has_its_code_query_id_and_no_format(front: Front) -> None:
    response = post(front, b"SELECT * FROM no_such_table_anywhere", query_id="failing-1")
    assert response.status_code == 404  # UNKNOWN_TABLE
    assert response.headers["X-ClickHouse-Exception-Code"] == "60"
    assert response.headers["X-ClickHouse-Query-Id"] == "failing-1"
    assert "X-ClickHouse-Format" not in response.headers
    assert response.text.startswith("Code: 60. DB::Exception:")


@pytest.mark.parametrize("parameter", ["compress", "decompress"])
def test_clickhouse_block_compression_is_refused_not_ignored(front: Front, parameter: str) -> None:
    response = post(front, b"SELECT 1", **{parameter: "1"})
    assert response.status_code == 501
    assert response.headers["X-ClickHouse-Exception-Code"] == "48"  # NOT_IMPLEMENTED


def test_bare_get_is_clickhouse_ok(front: Front) -> None:
    response = httpx.get(front.url)
    assert (response.status_code, response.text) == (200, "Ok.\n")


# --- request bodies are bytes ---------------------------------------------------------------


def test_query_body_bytes_reach_the_engine_as_sent(front: Front) -> None:
    assert post(front, b"SELECT hex('\xff\xfe')").text == "FFFE\n"


def test_query_parameter_bytes_reach_the_engine_as_sent(front: Front) -> None:
    response = httpx.get(front.url + "?query=SELECT+hex(%27%FF%FE%27)")
    assert response.text == "FFFE\n"


def test_insert_data_bytes_reach_the_table_as_sent(front: Front) -> None:
    name = table(front, "s String")
    post(front, b"\xff\xfe\x00a\n", query=f"INSERT INTO {name} FORMAT RawBLOB")
    assert post(front, f"SELECT hex(s) FROM {name}".encode()).text == "FFFE00610A\n"


# --- query parameters in INSERT ... VALUES --------------------------------------------------


def test_clickhouse_connect_binds_parameters_in_insert_values(front: Front) -> None:
    name = table(front, "id UInt32, s String")
    client = front.client()
    client.command(
        f"INSERT INTO {name} VALUES ({{id:UInt32}}, {{s:String}})",
        parameters={"id": 7, "s": "it's"},
    )
    assert client.query(f"SELECT id, s FROM {name}").result_rows == [(7, "it's")]


def test_url_parameters_bind_in_insert_values_sent_in_the_body(front: Front) -> None:
    name = table(front, "id UInt32, s String")
    response = post(
        front,
        f"INSERT INTO {name} VALUES ({{id:UInt32}}, {{s:String}}), (2, 'b')".encode(),
        param_id="1",
        param_s="a",
    )
    assert response.status_code == 200, response.text
    assert post(front, f"SELECT * FROM {name} ORDER BY id".encode()).text == "1\ta\n2\tb\n"


# --- external data --------------------------------------------------------------------------


def test_clickhouse_connect_sends_external_data_with_a_query(front: Front) -> None:
    ids = ExternalData(
        file_name="ids.tsv", data=b"3\n1\n2\n", structure=["id UInt32"], fmt="TabSeparated"
    )
    client = front.client()
    result = client.query("SELECT sum(id), count() FROM ids", external_data=ids)
    assert result.result_rows == [(6, 3)]
    with pytest.raises(DatabaseError, match="Code: 60"):  # for the query only, not the session
        client.query("SELECT count() FROM ids")


def test_multipart_external_data_with_types_and_format(front: Front) -> None:
    # As curl -F 'names=@names.csv' 'http://.../?names_types=String,UInt8&names_format=CSV'
    response = httpx.post(
        front.url,
        params={
            "query": "SELECT _1, _2 FROM names ORDER BY _2",
            "names_types": "String,UInt8",
            "names_format": "CSV",
        },
        files={"names": ("names.csv", b'"b",2\n"a",1\n')},
    )
    assert response.status_code == 200, response.text
    assert response.text == "a\t1\nb\t2\n"


def test_external_data_sets_a_table_filter_for_a_query_in_a_form_field(front: Front) -> None:
    name = table(front, "id UInt32")
    post(front, f"INSERT INTO {name} SELECT number FROM numbers(10)".encode())
    response = httpx.post(
        front.url,
        params={"keep_structure": "id UInt32"},
        data={"query": f"SELECT groupArray(id) FROM {name} WHERE id IN keep"},
        files={"keep": ("keep.tsv", b"4\n8\n")},
    )
    assert response.text == "[4,8]\n"


def test_external_data_without_structure_is_refused_as_clickhouse_does(front: Front) -> None:
    response = httpx.post(
        front.url, params={"query": "SELECT * FROM x"}, files={"x": ("x.tsv", b"1\n")}
    )
    assert response.status_code == 400
    assert response.headers["X-ClickHouse-Exception-Code"] == "36"
    assert (
        "Neither structure nor types have not been provided for external table x. "
        "Use fields x_structure or x_types to do so" in response.text
    )


# --- client_protocol_version: Native output as the client's revision expects it --------------


def test_clickhouse_connect_reads_datetime_in_its_column_time_zone(front: Front) -> None:
    client = front.client()
    assert client.protocol_version  # the front answered the client's probe with block info
    moment = "2024-06-01 12:00:00"
    row = client.query(
        f"SELECT toDateTime('{moment}', 'Asia/Tokyo') AS tokyo, "
        f"toDateTime('{moment}', 'America/New_York') AS ny, 7 AS n"
    ).result_rows[0]
    assert row[0] == dt.datetime(2024, 6, 1, 12, tzinfo=zoneinfo.ZoneInfo("Asia/Tokyo"))
    assert row[0].tzinfo == zoneinfo.ZoneInfo("Asia/Tokyo")
    assert row[1] == dt.datetime(2024, 6, 1, 12, tzinfo=zoneinfo.ZoneInfo("America/New_York"))
    assert row[2] == 7


def test_native_output_for_a_protocol_version_has_block_info_and_zones(front: Front) -> None:
    query = "SELECT toDateTime(0, 'Asia/Tokyo') AS d FORMAT Native"
    plain = post(front, query.encode()).content
    revised = post(front, query.encode(), client_protocol_version="54405").content
    assert b"\x08DateTime" in plain and b"Asia/Tokyo" not in plain  # revision 0 hides zones
    assert revised.startswith(b"\x01\x00\x02\xff\xff\xff\xff\x00")  # BlockInfo
    assert b"\x16DateTime('Asia/Tokyo')" in revised


@pytest.mark.parametrize(
    ("select", "wanted"),
    [
        ("toDateTime(0, 'Asia/Tokyo') AS d", True),
        ("7 AS n, 'x' AS s, toDateTime(0, 'UTC') AS d", True),  # found past other columns
        ("7 AS n, toDateTime64(0, 3, 'UTC') AS d64, [toDateTime(0, 'UTC')] AS a", False),
        ("'x' AS s", False),
    ],
)
def test_only_a_result_with_a_zoned_datetime_column_is_described(
    front: Front, select: str, wanted: bool
) -> None:
    # A DESCRIBE plans the statement a second time: asked for only when a zone is hidden (a
    # revision-0 block writes a top-level DateTime('Zone') as plain DateTime, nothing else).
    first_block = post(front, f"SELECT {select} FORMAT Native".encode()).content
    assert NativeUpgrade(54405).wants_column_types(first_block) is wanted
    assert not NativeUpgrade(REVISION_WITH_TIME_ZONE_IN_DATETIME - 1).wants_column_types(
        first_block
    )


ALL_TYPES = """
    SELECT number AS n, toString(number) AS s, toDateTime(number, 'Asia/Tokyo') AS dt,
        toDateTime64(number, 3, 'UTC') AS dt64, if(number % 2 = 0, NULL, number) AS nullable,
        [number, number + 1] AS arr, [[toString(number)], []] AS nested_arr,
        toLowCardinality(toString(number % 3)) AS lc,
        toLowCardinality(if(number % 2 = 0, NULL, toString(number))) AS lc_nullable,
        [toLowCardinality(toString(number))] AS arr_lc, map(toString(number), number) AS m,
        (number, toString(number)) AS t, CAST((1, 'x'), 'Tuple(a UInt8, b String)') AS named,
        toDecimal64(number, 3) AS d64, toDecimal128(number, 2) AS d128,
        CAST(number % 2, 'Enum8(\\'a\\' = 0, \\'b\\' = 1)') AS e, toFixedString('ab', 2) AS fs,
        toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0') AS u, toIPv4('1.2.3.4') AS ip4,
        toIPv6('::1') AS ip6, toDate(number) AS d, toDate32(number) AS d32,
        number % 2 = 0 AS b, toInt128(number) AS i128, toUInt256(number) AS u256,
        toFloat32(number) AS f32, [] AS empty_arr,
        toDateTime(number, 'Europe/Berlin') AS dt_last
    FROM numbers(3000)
"""


def test_every_column_type_reads_the_same_with_and_without_protocol_version(front: Front) -> None:
    with_version = front.client()
    without = front.client()
    without.protocol_version = 0  # as a client that never sends client_protocol_version
    assert with_version.protocol_version
    settings = {"max_block_size": 1000}  # several blocks, each with its own BlockInfo
    revised = with_version.query(ALL_TYPES, settings=settings)
    plain = without.query(ALL_TYPES, settings=settings)
    assert revised.column_names == plain.column_names
    # Only the zoned DateTime columns differ: with the protocol version they carry their zone.
    zoned = {revised.column_names.index(c) for c in ("dt", "dt_last")}
    for got, expected in zip(revised.result_rows, plain.result_rows, strict=True):
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            if i in zoned:  # the same instant, now in the column's zone
                assert a.timestamp() == b.timestamp()
                assert str(a.tzinfo) in ("Asia/Tokyo", "Europe/Berlin")
            else:
                assert a == b, (revised.column_names[i], a, b)
