"""Concurrency of the ClickHouse front: health checks never wait, requests over the engine's
limit wait in line (and say so), a query whose client went away is cancelled, and what the
embedded engine cannot do is answered with ClickHouse's own error.

Races are made deterministic: a query holds its engine slot for as long as its client does not
read the rest of a result far larger than any socket buffer, and the tests watch the front's
`/status` instead of the clock.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from clickhouse_fronts import HOST, Front, StartFront

ENDLESS = "SELECT number, repeat('x', 100) FROM numbers(10000000000)"


@pytest.fixture(scope="module")
def one_slot(start_front: StartFront) -> Front:
    """A front that runs one statement at a time; the others wait up to 5 minutes."""
    return start_front(options=["--max-concurrent-queries", "1", "--queue-max-wait", "300"])


@pytest.fixture(scope="module")
def impatient(start_front: StartFront) -> Front:
    """A front that runs one statement at a time and lets the next wait 0.2 s at most."""
    return start_front(options=["--max-concurrent-queries", "1", "--queue-max-wait", "0.2"])


def status(front: Front) -> dict:
    return httpx.get(f"{front.url}status", timeout=30).json()


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 60) -> None:
    """Poll a condition the test cannot be told about (no assertion on how long it takes)."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


@contextmanager
def slot_held(front: Front) -> Iterator[None]:
    """A query that keeps its engine slot until the block exits (its client stops reading)."""
    with httpx.stream("GET", front.url, params={"query": ENDLESS}, timeout=60) as running:
        chunks = running.iter_raw()  # kept: a dropped iterator closes the connection
        next(chunks)
        yield


def in_background(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    return thread, result


def test_request_over_the_limit_waits_and_says_so(one_slot: Front) -> None:
    query_id = f"waiter-{uuid.uuid4().hex[:8]}"
    with slot_held(one_slot):
        thread, result = in_background(
            lambda: httpx.get(
                one_slot.url, params={"query": "SELECT 42", "query_id": query_id}, timeout=300
            )
        )
        wait_until(
            lambda: [w["query_id"] for w in status(one_slot)["queries"]["waiting"]] == [query_id],
            "the second request to wait in line",
        )
        now = status(one_slot)["queries"]
        assert len(now["running"]) == 1
        assert now["waiting"][0]["waiting_s"] >= 0
        # Health checks never queue behind the engine.
        assert httpx.get(f"{one_slot.url}ping", timeout=10).text == "Ok.\n"
        assert httpx.get(f"{one_slot.url}replicas_status", timeout=10).text == "Ok.\n"
    thread.join(timeout=300)
    assert result[0].text == "42\n"
    assert status(one_slot)["queries"]["queued"] >= 1
    assert f"query {query_id} waits for the engine" in one_slot.log
    assert f"query {query_id} waited" in one_slot.log


def test_request_that_waits_too_long_gets_too_many_simultaneous_queries(
    impatient: Front,
) -> None:
    with slot_held(impatient):
        response = httpx.get(impatient.url, params={"query": "SELECT 1"}, timeout=60)
    assert response.headers["X-ClickHouse-Exception-Code"] == "202"
    assert "Too many simultaneous queries. Maximum: 1" in response.text
    assert status(impatient)["queries"]["refused"] >= 1


def running_queries(front: Front, tag: str) -> int:
    sql = (
        f"SELECT count() FROM system.processes WHERE query LIKE '%{tag}%' "
        "AND query NOT LIKE '%system.processes%'"
    )
    return int(httpx.post(front.url, content=sql.encode(), timeout=60).text)


@contextmanager
def an_hour_long_query_running(front: Front) -> Iterator[str]:
    """A client waiting for a query that would run for an hour, started and running in the
    engine while the block runs (its tag is yielded); the client hangs up when the block ends."""
    # JSON is written in one piece, so the query runs to its end before the answer starts; it
    # would run for an hour (1000 blocks of one row, 3 s of sleep each).
    tag = f"tag_{uuid.uuid4().hex[:8]}"
    query = f"SELECT sleepEachRow(3) AS {tag} FROM numbers(1000) SETTINGS max_block_size = 1"
    request = (
        f"POST /?default_format=JSON HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Length: {len(query)}\r\n\r\n{query}"
    )
    with socket.create_connection((HOST, front.port), timeout=30) as sock:
        sock.sendall(request.encode())
        wait_until(lambda: running_queries(front, tag) == 1, "the query to start")
        yield tag


def test_query_whose_client_disconnects_is_cancelled(front: Front) -> None:
    with an_hour_long_query_running(front) as tag:
        pass
    # The client hung up: the front cancels the query in the engine.
    wait_until(lambda: running_queries(front, tag) == 0, "the query to be cancelled")
    assert "client went away, cancelling it" in front.log


def test_streamed_query_whose_client_disconnects_is_cancelled(front: Front) -> None:
    tag = f"tag_{uuid.uuid4().hex[:8]}"
    with httpx.stream(
        "GET", front.url, params={"query": f"{ENDLESS} /* {tag} */"}, timeout=60
    ) as response:
        chunks = response.iter_raw()
        next(chunks)
        assert running_queries(front, tag) == 1
    wait_until(lambda: running_queries(front, tag) == 0, "the streamed query to be cancelled")
    assert "client went away mid-result" in front.log


def test_a_streamed_answer_sent_to_its_end_is_not_taken_for_a_client_that_went_away(
    front: Front,
) -> None:
    # The server reports the end of a complete answer as a disconnect too.
    query_id = f"whole-{uuid.uuid4().hex[:8]}"
    with httpx.Client(timeout=60) as client:  # one connection, kept alive
        answer = client.post(
            front.url, params={"query_id": query_id}, content=b"SELECT number FROM numbers(3)"
        )
        assert answer.text.split() == ["0", "1", "2"]
        assert client.post(front.url, content=b"SELECT 1").text.strip() == "1"
    assert f"query {query_id}: client went away" not in front.log


@pytest.mark.parametrize(
    ("statement", "status_code", "code"),
    [
        ("CREATE USER someone IDENTIFIED BY 'x'", 403, "497"),  # ACCESS_DENIED: no users
        ("SELECT count() FROM system.query_log", 404, "60"),  # UNKNOWN_TABLE: no query log
        (
            "CREATE TABLE replicated (a UInt8) ENGINE = ReplicatedMergeTree('/t', 'r') ORDER BY a",
            500,
            "225",  # NO_ZOOKEEPER
        ),
        ("CREATE TABLE on_cluster ON CLUSTER default (a UInt8) ENGINE = Memory", 500, "701"),
    ],
    ids=["users", "query_log", "keeper", "cluster"],
)
def test_what_the_engine_cannot_do_gets_clickhouse_own_error(
    front: Front, statement: str, status_code: int, code: str
) -> None:
    response = httpx.post(front.url, content=statement.encode(), timeout=60)
    assert response.status_code == status_code
    assert response.headers["X-ClickHouse-Exception-Code"] == code
    assert response.text.startswith(f"Code: {code}. DB::Exception:")


def test_shutdown_cancels_running_statements_and_closes_the_engine_cleanly(
    start_front: StartFront,
) -> None:
    front = start_front()
    with an_hour_long_query_running(front):
        # The client is still waiting for its answer: uvicorn alone would wait for it for an
        # hour, and the stack would SIGKILL the server after its stop timeout.
        front.stop()
    assert "chdb engine closed" in front.log
