"""How far behind MongoDB the live updates (the change-stream followers) are.

Read from `ops.change_stream_state`: each follower saves its position there with the lag of its
last stored batch, at most every 0.5 s while batches come and at least every few seconds while
idle (`loader.follower.ALIVE_EVERY_S`), so a recent `saved_at` means "running", one older than
`SILENT_AFTER_S` "stopped". `make demo` runs no follower: that is the neutral "off" state, never
an alarm. Shared by the web banner and `make dashboard`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from loader.follower import SILENT_AFTER_S

# Ages come from ClickHouse's clock (the one that stamped `saved_at`), not the reader's.
LAG_SQL = """
SELECT collection, lag_seconds,
       dateDiff('millisecond', saved_at, now64(6)) / 1000 AS saved_age_s,
       if(last_event_at IS NULL, NULL, toUnixTimestamp64Milli(last_event_at)) AS last_event_ms
FROM ops.change_stream_state FINAL
WHERE resume_token != ''
ORDER BY collection
"""


class LiveLevel(StrEnum):
    live = "live"  # running and in step (within the threshold)
    behind = "behind"  # running, more than the threshold behind: a warning
    off = "off"  # no follower running, or none ever ran: neutral


@dataclass(frozen=True)
class LiveLag:
    level: LiveLevel
    text: str
    lag_seconds: float | None = None  # of the furthest-behind running follower


OFF_TEXT = "live updates off — `make serve` runs them"


def live_lag(rows: list[dict[str, Any]], warn_seconds: float) -> LiveLag:
    """The state of the live updates from `LAG_SQL`'s rows: the furthest-behind follower that
    is still running decides; a follower silent for `SILENT_AFTER_S` counts as stopped."""
    running = [r for r in rows if float(r["saved_age_s"]) <= SILENT_AFTER_S]
    if not running:
        return LiveLag(LiveLevel.off, OFF_TEXT)
    worst = max(running, key=lambda r: float(r["lag_seconds"]))
    lag = float(worst["lag_seconds"])
    if lag > warn_seconds:
        return LiveLag(
            LiveLevel.behind,
            f"live updates {lag:,.0f} s behind MongoDB ({worst['collection']}; warning above "
            f"{warn_seconds:g} s): catching up in batches",
            lag,
        )
    if lag >= 1:
        return LiveLag(LiveLevel.live, f"live: {lag:.0f} s behind", lag)
    return LiveLag(LiveLevel.live, "live", lag)
