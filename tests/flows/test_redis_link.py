"""The Redis link of long-lived processes (web server, change followers): one warning that says
what goes missing, and Redis used again once it is back."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from flows.redis_link import FOLLOWER_WITHOUT_REDIS, RetryingRedisLink
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
