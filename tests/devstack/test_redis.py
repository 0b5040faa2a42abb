"""The embedded Redis is a real redis-server 6.2."""

from __future__ import annotations

import time

import redis


def test_set_get_round_trip(redis_client: redis.Redis) -> None:
    redis_client.set("devstack:test:roundtrip", "value")
    assert redis_client.get("devstack:test:roundtrip") == b"value"


def test_key_expires_after_its_ttl(redis_client: redis.Redis) -> None:
    redis_client.set("devstack:test:expire", "value", px=200)
    assert redis_client.pttl("devstack:test:expire") > 0
    # Poll instead of a fixed sleep: the assertion is about expiry, not about timing.
    deadline = time.monotonic() + 10
    while redis_client.exists("devstack:test:expire") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_client.get("devstack:test:expire") is None


def test_server_is_redis_6_2(redis_client: redis.Redis) -> None:
    assert redis_client.info("server")["redis_version"].startswith("6.2.")
