"""Fairness at the frontend's door: a flood is held cheaply, per client, before the hop.

Why it exists: the GPU tier's scheduler is fair, but only among the requests
that reach it. In front of it sit stages that serve in arrival order once they
are saturated: the hop's connection pool, the GPU tier's ingest, the status
traffic of every waiting request. A crowd of 2,000 requests pushed through all
of them made a light client that came 3 s later wait a minute (issue 10).
Kubernetes' API Priority and Fairness answers the same problem in the HTTP
filter chain, before the expensive handler runs; this is that idea, sized for
one frontend:

- **Per-flow queues.** Requests are grouped by flow (``splitspace.session.identity.flow_of``:
  an API key, or an address for all its anonymous sessions). At most
  ``per_flow`` requests of one flow (its ``max_running``, if more) are *inside*
  (on their way to or waiting at the GPU tier, where the fair scheduler orders
  them); the rest wait here, in their flow's FIFO, as a parked coroutine and a
  future: bytes, not a connection, not a GPU-tier job, not status traffic.
- **Fair release.** At most ``total`` requests are inside in all: enough to keep
  the GPU tiers busy, few enough that the frontend's Gradio and the hop carry only
  those (each one inside costs a Gradio event, a worker and a hop stream; a crowd
  of 2,000 let in at once spent seconds of the event loop that a light client then
  waited for). When a place frees, the next request comes from the flow with the
  smallest virtual start time (start-time fair queueing, as APF's queue set: each
  release advances its flow's tag by ``1 / weight``; a flow that starts waiting
  begins at the door's virtual time, so it is never behind another flow's backlog,
  and earns no credit for the time it was away). Among flows due at the same
  virtual time, one that has not been let in yet goes first: a light client that
  arrives mid-round is next, not behind the rest of the round (it delays each of
  those by one request; every flow still gets one turn per round). The ready flows
  are a ``sortedcontainers.SortedList`` by virtual start: O(log n) per decision and
  per estimate of a waiter's place, whatever the number of flows.
- **Parked calls.** A REST call answered with an event id joins *parked*
  (``join(parked=True)``): it counts against its flow's cap but is not in line, and
  joins the line when its caller comes back for it (``Place.unpark``). A place inside
  is for work a caller is waiting for: calls let in with nobody to read them kept the
  door full for free while the GPU idled, and calls run with nobody to read them took
  the GPU from those who read theirs.
- **Caps.** A flow with ``cap`` requests in flight (inside + waiting + parked: the
  client's ``max_running + max_queued``) is refused with ``Queue full``; the
  ASGI middleware (``door_middleware.py``) asks the same question before Gradio
  queues anything.

The GPU tier's ``max_running`` per client keeps its own meaning; ``per_flow``
only bounds how far ahead a flow's requests travel (its lookahead), so the
GPU tier always has each active flow's next job at hand.

The class is a plain data structure over asyncio futures (no Gradio, no I/O);
``FrontendCore.follow_call`` drives it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from splitspace.shared.contract.errors import QUEUE_FULL, Throttled
from splitspace.shared.contract.hop import Status


@dataclass
class _Flow:
    finish: float
    """The virtual finish time of its last request let in (its next one's start, unless the
    door's virtual time has passed it)."""
    weight: float = 1.0
    room: int = 1
    """How many of its requests may be inside at once."""
    new: bool = True
    """Not let in yet: ahead of flows due at the same virtual time."""
    inside: int = 0
    waiting: deque[Place] = field(default_factory=deque)
    parked: int = 0
    """Its requests counted in flight but not in line: calls whose caller has not come back
    for them yet (``join(parked=True)``)."""
    ready: _Key | None = None
    """Its key in the door's ready flows (those with a request waiting and room of their own)."""


_Key = tuple[float, bool, int, str]
"""A ready flow's place in the door's order: (virtual start, not new, arrival, flow id)."""


class Place:
    """One request's place at the door: in its flow's line until ``turn`` is done, then
    inside until :meth:`leave` (idempotent). ``told`` is the last status its caller
    heard, so whoever drives the request next (the door's middleware, then the Gradio
    handler) never tells a caller a worse place than before."""

    __slots__ = ("_door", "flow_id", "_flow", "turn", "told", "on_leave", "_left", "_parked")

    def __init__(self, door: FairDoor, flow_id: str, flow: _Flow) -> None:
        self._door = door
        self.flow_id = flow_id
        self._flow = flow
        self.turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.told: Status | None = None
        self.on_leave: Callable[[], None] | None = None
        """Called once when the place is given back (the shared count's release)."""
        self._left = False
        self._parked = False

    @property
    def inside(self) -> bool:
        return self.turn.done() and not self.turn.cancelled()

    def position(self) -> int:
        """The estimated place in line (1 = next to go in; 0 once inside; not asked of a
        parked place, whose caller has no stream yet): the flows due before its flow's next
        turn, and a round over the flows that have work for each request of its own flow
        ahead of it (waiting, or inside: at the GPU tier)."""
        if self._left or self.inside:
            return 0
        door, f = self._door, self._flow
        key = f.ready or (max(f.finish, door._vtime), not f.new, -1, "")
        ahead = f.waiting.index(self) + f.inside
        return door._ready.bisect_left(key) + ahead * len(door._flows) + 1

    def unpark(self) -> None:
        """Its caller is back: join the flow's line now (or go in at once, given room)."""
        if not self._left and self._parked:
            self._parked = False
            self._door._unpark(self)

    def leave(self) -> None:
        """Give the place back (done, failed or gone): the next request may go in."""
        if not self._left:
            self._left = True
            self._door._leave(self)
            if self.on_leave is not None:
                self.on_leave()


class FairDoor:
    def __init__(self, *, per_flow: int = 2, total: int = 64) -> None:
        if per_flow < 1 or total < 1:
            raise ValueError("per_flow and total must be at least 1")
        self.per_flow = per_flow
        self.total = total
        self._flows: dict[str, _Flow] = {}
        self._ready: SortedList[_Key] = SortedList()  # the flows with a request waiting and room of their own
        self._order = itertools.count()  # ties go to the flow that became ready first
        self._vtime = 0.0  # the virtual start time of the last request let in from a line
        self._inside = 0
        self._waiting = 0
        self._handed: dict[str, Place] = {}

    # -- questions ----------------------------------------------------------------------
    def count(self, flow_id: str) -> int:
        """Requests of this flow in flight here: inside, waiting and parked."""
        f = self._flows.get(flow_id)
        return 0 if f is None else f.inside + len(f.waiting) + f.parked

    @property
    def inside(self) -> int:
        return self._inside

    @property
    def waiting(self) -> int:
        return self._waiting

    def check_cap(self, flow_id: str, cap: int) -> None:
        """Raise Queue full when the flow already has ``cap`` requests in flight."""
        in_flight = self.count(flow_id)
        if in_flight >= cap:
            raise Throttled(
                QUEUE_FULL, f"{in_flight} requests already in flight (max_running + max_queued = {cap})", 1.0
            )

    # -- moving through ------------------------------------------------------------------
    def join(self, flow_id: str, cap: int, weight: float = 1.0, room: int = 1, *, parked: bool = False) -> Place:
        """Join the flow's line, or raise Queue full. The place's ``turn`` is done once the
        request is inside (at once when its flow and the door have room). ``weight``: the
        client's share (its tier's), relative to other flows'; ``room``: how many of its
        requests may be inside at once, if more than ``per_flow`` (its ``max_running``).
        ``parked``: counted in the cap but not in line until :meth:`Place.unpark` (a call
        answered with an event id, whose caller has not come back for it yet)."""
        self.check_cap(flow_id, cap)
        f = self._flows.get(flow_id)
        if f is None:
            f = self._flows[flow_id] = _Flow(finish=self._vtime)
        f.weight = weight if weight > 0 else 1.0
        f.room = max(self.per_flow, room)
        place = Place(self, flow_id, f)
        if parked:
            place._parked = True
            f.parked += 1
        else:
            self._line_up(f, place)
        return place

    def _line_up(self, f: _Flow, place: Place) -> None:
        if f.inside < f.room and self._inside < self.total and not f.waiting:
            # Room everywhere, so nobody waits for it (no flow is ready) and the door's virtual
            # time stays. The flow's own time counts only what it has inside: it may use a
            # quiet door as much as it likes without owing turns when a crowd comes.
            f.finish = max(self._vtime, min(f.finish, self._vtime + f.inside / f.weight))
            self._enter(f, place)
        else:
            f.waiting.append(place)
            self._waiting += 1
            self._mark_ready(place.flow_id, f)

    @contextmanager
    def hold(self, flow_id: str, cap: int, weight: float = 1.0, room: int = 1) -> Iterator[Place]:
        """:meth:`join`, and leave when the block ends (done, failed or cancelled)."""
        place = self.join(flow_id, cap, weight, room)
        try:
            yield place
        finally:
            place.leave()

    def hand_over(self, place: Place) -> str:
        """A one-time pass for this place, for the next stage to :meth:`take` (the door's
        middleware joins; the Gradio handler, reached through Gradio, carries on)."""
        nonce = secrets.token_urlsafe(16)
        self._handed[nonce] = place
        return nonce

    def take(self, nonce: str | None, flow_id: str) -> Place | None:
        """The place handed over under this pass, once, if it is the same flow's."""
        place = self._handed.pop(nonce, None) if nonce else None
        if place is not None and place.flow_id != flow_id:
            return None
        return place

    def _unpark(self, place: Place) -> None:
        place._flow.parked -= 1
        self._line_up(place._flow, place)

    def _leave(self, place: Place) -> None:
        f = place._flow
        if place.inside:
            f.inside -= 1
            self._inside -= 1
        else:
            place.turn.cancel()
            if place._parked:
                f.parked -= 1
            else:
                f.waiting.remove(place)
                self._waiting -= 1
                if not f.waiting and f.ready is not None:  # nothing left to let in
                    self._ready.remove(f.ready)
                    f.ready = None
        if not f.inside and not f.waiting and not f.parked:
            del self._flows[place.flow_id]
        else:
            self._mark_ready(place.flow_id, f)  # it may have room of its own again
        self._release()

    def _enter(self, f: _Flow, place: Place) -> None:
        f.finish = max(f.finish, self._vtime) + 1.0 / f.weight
        f.new = False
        f.inside += 1
        self._inside += 1
        place.turn.set_result(None)

    def _mark_ready(self, flow_id: str, f: _Flow) -> None:
        if f.waiting and f.inside < f.room and f.ready is None:
            f.ready = (f.finish, not f.new, next(self._order), flow_id)
            self._ready.add(f.ready)

    def _release(self) -> None:
        """Let waiting requests in, the ready flow with the smallest virtual start first,
        while there is room in total. A flow is ready exactly while it has a request
        waiting and room of its own (its key, its finish time, changes only when it is let
        in, and then it is out of the list; a flow with nothing waiting is never ready, so
        a flow that empties leaves nothing behind), so each decision is O(log n)."""
        while self._ready and self._inside < self.total:
            key = self._ready.pop(0)
            f = self._flows[key[3]]
            f.ready = None
            self._waiting -= 1
            self._vtime = max(self._vtime, f.finish)  # its start: the smallest of the ready flows'
            self._enter(f, f.waiting.popleft())
            self._mark_ready(key[3], f)


def eta_s(place: int, seconds_per_job: float) -> float:
    """An ETA for a place in line, from the measured seconds per job."""
    return 0.0 if not math.isfinite(seconds_per_job) else round(place * seconds_per_job, 1)
