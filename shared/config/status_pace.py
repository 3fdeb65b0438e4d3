"""How often a waiting request hears where it stands: often near the front, rarely far back.

Why it exists: every status update costs CPU on both tiers and on the way to
the caller, and a crowd of thousands waiting for minutes turned a fixed
interval into thousands of messages a second (issue 10). Updates now go out
when the place changed and enough time has passed for the place it is at:
half a second for the first ten places, then about 0.05 s per place ahead
(position 100: every 5 s; 600 or more: every 30 s). Summed over a queue of
``n`` waiters that is about ``20 + 20 ln(n / 10)`` messages a second, whatever
the waiting time: 2,000 waiters cost about 130 a second, not 1,000.

Between the GPU tier and the frontend a status also serves as a heartbeat (the
frontend takes silence longer than its backend timeout as a dead GPU tier), so
the GPU tier repeats one at least every ``HEARTBEAT_S``; the frontend passes on
to callers only the ones whose place changed.
"""

from __future__ import annotations

FIRST_AFTER_S = 0.5
"""A job done sooner than this sends no status at all (most jobs on an idle GPU)."""
HEARTBEAT_S = 5.0
"""The GPU tier says something at least this often while a job waits."""
NEAR_FRONT = 10
NEAR_FRONT_EVERY_S = 0.5
PER_PLACE_S = 0.05
MAX_EVERY_S = 30.0


def interval_s(position: int) -> float:
    """Seconds until a waiter at ``position`` should hear its place again."""
    if position <= NEAR_FRONT:
        return NEAR_FRONT_EVERY_S
    return min(MAX_EVERY_S, max(NEAR_FRONT_EVERY_S, PER_PLACE_S * position))
