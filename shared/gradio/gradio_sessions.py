"""What Gradio keeps per browser session, bounded and given back (both tiers).

Why it exists: Gradio 6.31 keeps a ``SessionState`` per session hash in
``StateHolder.session_data`` (an LRU of ``blocks.state_session_capacity``, 10,000 by
default), and every call creates one: each REST call is a session of its own, and
each browser tab's ``GET /gradio_api/heartbeat/<session>`` stream creates one when it
ends (the ``unload`` handlers run with it). A closed session's state is only marked
closed ("deleted in an hour", which never removes the entry itself), so 2,000 idle
heartbeat streams that came and went cost 88 MB that was not given back (issue 21).
An open heartbeat stream costs a task, a response and its ASGI state (about 40 KB),
for as long as the client keeps it open, at no cost to the client.

- :func:`bound_session_states` sets Gradio's own ``state_session_capacity``: the
  sessions whose state is kept at once. Neither tier keeps anything a session needs
  in it (no ``gr.State``; the page's history is a ``gr.BrowserState``, in the
  browser), so an evicted session loses nothing.
- :class:`HeartbeatCap` (ASGI) lets at most ``per_address`` heartbeat streams be open
  per address and ``total`` in all; beyond, ``429`` with ``Retry-After`` and
  ``{"title": "Too many open pages", "message"}`` (Gradio's page works without its
  heartbeat; it only misses the ``unload`` when the tab closes). When a stream ends
  (after Gradio's ``unload`` handlers ran, in the same request), the session's state
  is dropped unless an event of that session is still pending.
- :func:`forget_finished_states` (a tier's periodic housekeeping) drops the state of
  every other session with no event pending and no page open: each finished REST call's.

These touch Gradio internals (``StateHolder.session_data``, the heartbeat route);
``tests/test_gradio_tuning.py`` fails when they no longer apply.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from splitspace.shared.http.guard import send_problem

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger("splitspace")

TOO_MANY_PAGES = "Too many open pages"
RETRY_S = 30
"""The Retry-After of a refused heartbeat: open pages close at human speed."""
HOUSEKEEPING_S = 30.0
"""How often each tier drops what finished calls and idle clients left behind."""


def bound_session_states(blocks: gr.Blocks, sessions: int) -> bool:
    """Keep at most ``sessions`` sessions' state in Gradio's ``StateHolder`` (call before
    the app is mounted: the holder reads it then). True when applied."""
    if not isinstance(getattr(blocks, "state_session_capacity", None), int):
        log.warning("Gradio's Blocks changed shape; its session state capacity is left as it is")
        return False
    blocks.state_session_capacity = max(1, int(sessions))
    return True


def forget_session_state(blocks: gr.Blocks, session_hash: str) -> bool:
    """Drop a session's ``SessionState`` unless one of its events is still pending; True
    when it was dropped."""
    holder: Any = getattr(blocks, "state_holder", None)
    data = getattr(holder, "session_data", None)
    if not isinstance(data, dict) or session_hash not in data:
        return False
    pending = getattr(getattr(blocks, "_queue", None), "pending_event_ids_session", {})
    if isinstance(pending, dict) and pending.get(session_hash):
        return False
    with holder.lock:
        data.pop(session_hash, None)
        holder.time_last_used.pop(session_hash, None)
    return True


async def every(seconds: float, work: Callable[[], object]) -> None:
    """Run ``work`` every ``seconds`` (a tier's housekeeping task, from its lifespan); a
    failure is logged and the next turn comes as usual."""
    while True:
        await asyncio.sleep(seconds)
        try:
            work()
        except Exception:  # housekeeping must not stop for good
            log.exception("housekeeping failed; trying again in %g s", seconds)


def session_count(blocks: gr.Blocks) -> int:
    """Sessions whose state Gradio keeps now (for ``/health``)."""
    data = getattr(getattr(blocks, "state_holder", None), "session_data", None)
    return len(data) if isinstance(data, dict) else 0


def forget_finished_states(blocks: gr.Blocks, open_pages: Container[str]) -> int:
    """Drop the state of the sessions with no event pending and no page open (O(sessions
    kept), at most the capacity); how many are left."""
    data = getattr(getattr(blocks, "state_holder", None), "session_data", None)
    if not isinstance(data, dict):
        return 0
    for session in [s for s in data if s not in open_pages]:
        forget_session_state(blocks, session)
    return len(data)


class OpenHeartbeats:
    """The heartbeat streams open now, per address and in all (read by ``/health``)."""

    def __init__(self, per_address: int, total: int) -> None:
        if per_address < 1 or total < 1:
            raise ValueError("per_address and total must be at least 1")
        self.per_address = per_address
        self.total = total
        self.by_address: Counter[str] = Counter()
        """Only addresses with a stream open."""
        self.sessions: Counter[str] = Counter()
        """The sessions with a stream open (their state is kept)."""
        self.open = 0

    def refusal(self, address: str) -> str | None:
        """Why one more stream from ``address`` is refused, or None."""
        if self.open >= self.total:
            return f"{self.open} pages are open on this server (at most {self.total})"
        if self.by_address[address] >= self.per_address:
            return f"{self.by_address[address]} pages are open from this address (at most {self.per_address})"
        return None

    def opened(self, address: str, session: str) -> None:
        self.open += 1
        self.by_address[address] += 1
        self.sessions[session] += 1

    def closed(self, address: str, session: str) -> None:
        self.open -= 1
        for count, key in ((self.by_address, address), (self.sessions, session)):
            count[key] -= 1
            if count[key] <= 0:
                del count[key]


class HeartbeatCap:
    """Caps the open heartbeat streams per address and in all (``streams``); gives each
    session's state back when its stream ends. See the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        blocks: gr.Blocks,
        address: Callable[[Scope], str],
        streams: OpenHeartbeats,
        prefix: str = "/gradio_api",
    ) -> None:
        self.app = app
        self.blocks = blocks
        self.address = address
        self.streams = streams
        self.route = f"{prefix}/heartbeat/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if scope["type"] != "http" or scope["method"] != "GET" or not path.startswith(self.route):
            await self.app(scope, receive, send)
            return
        address = self.address(scope)
        refusal = self.streams.refusal(address)
        if refusal is not None:
            await _refuse(send, refusal)
            return
        session = path[len(self.route) :].strip("/")
        self.streams.opened(address, session)
        try:
            await self.app(scope, receive, send)
        finally:
            self.streams.closed(address, session)
            if session not in self.streams.sessions:
                forget_session_state(self.blocks, session)


async def _refuse(send: Send, why: str) -> None:
    message = f"{why}; close one, or retry in {RETRY_S} s"
    await send_problem(
        send,
        429,
        TOO_MANY_PAGES,
        message,
        {"title": TOO_MANY_PAGES, "message": message, "retry_after_s": RETRY_S},
        headers=((b"retry-after", str(RETRY_S).encode()),),
    )
