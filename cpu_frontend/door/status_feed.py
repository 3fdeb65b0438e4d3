"""What a waiting caller hears, and when: one rule for the door's line and the GPU tier's.

Why it exists: a request's statuses come from two places in turn (its place at the
frontend's door, then the GPU tier's queue), and are sent by two stages (the door's
middleware for a REST call still held before Gradio, then the Gradio handler). Both
follow :class:`Told`: a caller hears its first status, the start of its run, and a
better place; with no news, the last status again at ``status_pace``'s interval for
its place (a send is also how a server notices a caller who left).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from splitspace.cpu_frontend.door.door import Place, eta_s
from splitspace.shared.config import status_pace
from splitspace.shared.contract.hop import Status


def is_news(told: Status | None, status: Status) -> bool:
    """Whether a caller should hear this status: its first, the start of its run, or a
    better place in line. A place never goes back on screen (the door's estimate and the
    GPU tier's exact place can disagree by a few when a request crosses the hop)."""
    if told is None or status.state != told.state:
        return told is None or status.state == "running"
    return status.state == "queued" and status.position < told.position


class Told:
    """The last status a caller heard, and when; :meth:`next` says what to send now."""

    __slots__ = ("status", "at")

    def __init__(self, status: Status | None = None) -> None:
        self.status = status
        self.at = time.monotonic()

    def next(self, status: Status) -> Status | None:
        """The status to send now: this one if it is news, else the last one again when
        its interval has passed, else None."""
        now = time.monotonic()
        if is_news(self.status, status):
            self.status, self.at = status, now
            return status
        if self.status is not None and now - self.at >= status_pace.interval_s(self.status.position):
            self.at = now
            return self.status
        return None


async def wait_turn(
    place: Place, told: Told, seconds_per_job: Callable[[], float], gone: asyncio.Future[Any] | None = None
) -> AsyncGenerator[Status, None]:
    """Until the place is inside (or ``gone`` is done: the caller left): its first place at
    once, then as ``status_pace`` says."""
    also = [] if gone is None else [gone]
    while not place.inside and not (gone is not None and gone.done()):
        position = place.position()
        status = told.next(Status("queued", position, eta_s(position, seconds_per_job())))
        if status is not None:
            yield status
        await asyncio.wait(
            [place.turn, *also], timeout=status_pace.interval_s(position), return_when=asyncio.FIRST_COMPLETED
        )
