"""Per-step timings of one hot-path batch, for the follower's debug log line.

`Steps` maps a step's name (`rows`, `tombstones`, `stale`, ...) to the milliseconds it took;
`Steps.time(name)` measures a block. Only reporting: nothing decides anything on them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Steps(dict[str, float]):
    """Step name -> milliseconds (a step timed twice adds up)."""

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + (time.perf_counter() - t0) * 1000

    def line(self) -> str:
        """`name=12 other=3` (ms, rounded), in the order the steps ran."""
        return " ".join(f"{name}={ms:.0f}" for name, ms in self.items())
