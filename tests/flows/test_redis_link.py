"""The Redis link: one warning that says what goes missing; for long-lived processes (web server,
change followers), Redis used again once it is back."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pytest

from flows.redis_link import FOLLOWER_WITHOUT_REDIS, RedisLink, RetryingRedisLink
from flows.settings import FlowSettings


def test_a_retrying_link_warns_once_and_uses_redis_again_once_it_is_back(
    stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.redis_link")
    link = RetryingRedisLink(FlowSettings(), log, without=FOLLOWER_WITHOUT_REDIS)
    link.retry_after_s = 0.2
    assert link.call(lambda c: c.ping(), None) is True
    link.close()  # the next call connects again, to a Redis that is gone
    stack.kill("redis")
    try:
        with caplog.at_level(logging.WARNING, logger=log.name):
            down = [link.call(lambda c: c.ping(), None) for _ in range(2)]
            time.sleep(0.3)
            still_down = link.call(lambda c: c.ping(), None)
    finally:
        stack.start("redis")
    time.sleep(0.3)

    assert down == [None, None] and still_down is None
    assert link.call(lambda c: c.ping(), None) is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert FOLLOWER_WITHOUT_REDIS in warnings[0]
    link.close()


def test_a_command_redis_refuses_costs_only_that_call_and_one_warning(
    stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.redis_link.refused")
    link = RedisLink(FlowSettings(), log)
    key = f"test-refused-{uuid.uuid4().hex[:8]}"
    assert link.call(lambda c: c.rpush(key, "not a counter"), None) == 1
    try:
        with caplog.at_level(logging.WARNING, logger=log.name):
            refused = [link.call(lambda c: c.incr(key), None) for _ in range(2)]  # WRONGTYPE
        answered = link.call(lambda c: c.ping(), None)
    finally:
        link.call(lambda c: c.delete(key), None)
        link.close()

    assert refused == [None, None]
    assert answered is True  # not taken for down
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "refused a command" in warnings[0], warnings
