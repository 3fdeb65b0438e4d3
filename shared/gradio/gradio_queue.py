"""Three things Gradio's queue keeps per call that a crowd turns into lost replies,
CPU that grows with every call served, and memory that never comes back; set right
on both tiers.

**The session cache** (:func:`hold_sessions`).

Gradio 6.31 keeps each session's pending messages in an ``LRUCache(2000)``
(``Queue.pending_messages_per_session``). Every REST call
(``/gradio_api/call/...``) is its own session, so with more than 2,000 calls in
flight the oldest session's messages are evicted while it still waits; its
event stream then finds no session and raises ``404`` after the response has
started, which the caller sees as a connection cut off mid-reply (the lost
requests of the first release's crowd benchmark). The cache bounds memory for
sessions that never read their messages; here it is sized to what a tier lets
in flight instead.

**Analytics** (:func:`bound_analytics`). On every event that ends, Gradio 6.31 copies
its last ``GRADIO_ANALYTICS_MAX_EVENTS`` (10,000) event records and, every
``GRADIO_ANALYTICS_CACHE_FREQUENCY`` (1) events, builds a pandas DataFrame of them
for per-endpoint percentiles. The cost per call grew with the calls served so far:
three crowd rounds of 2,000 calls on one frontend cost 40, 42 and 48 s of CPU, and
the light client's wait doubled (issue 10). The records are bounded to
``ANALYTICS_EVENTS`` and the summary recomputed every ``ANALYTICS_EVERY`` events.

**Finished sessions** (:func:`forget_finished_sessions`). Gradio removes a finished
event's id from its session's set but keeps the session's entry (and its message
queue, in the cache above) for good: one entry per REST call ever made, and the
lookup of a finished event's stream (Gradio's and the guard's) walks them all. A
sweep drops sessions with no event pending and no message waiting.

These are Gradio internals: each function checks the shape it expects and leaves
Gradio as it is (with a log line) when that shape changed; ``tests/test_gradio_tuning.py``
fails when one no longer applies.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger("splitspace")


def hold_sessions(blocks: gr.Blocks, sessions: int) -> bool:
    """Let the queue of ``blocks`` (after ``blocks.queue()``) hold ``sessions`` sessions'
    messages at once. True when applied."""
    cache = getattr(getattr(blocks, "_queue", None), "pending_messages_per_session", None)
    if cache is None or not isinstance(getattr(cache, "max_size", None), int):
        log.warning("Gradio's queue changed shape; its session limit is left as it is")
        return False
    cache.max_size = max(cache.max_size, sessions)
    return True


ANALYTICS_EVENTS = 256
ANALYTICS_EVERY = 256


def bound_analytics(blocks: gr.Blocks, events: int = ANALYTICS_EVENTS, every: int = ANALYTICS_EVERY) -> bool:
    """Keep at most ``events`` event records and summarise them every ``every`` events.
    True when applied."""
    queue = getattr(blocks, "_queue", None)
    counters = ("ANALYTICS_MAX_EVENTS", "ANAYLTICS_CACHE_FREQUENCY")
    if (
        queue is None
        or not all(isinstance(getattr(queue, a, None), int) for a in counters)
        or not isinstance(getattr(queue, "event_analytics", None), dict)
    ):
        log.warning("Gradio's queue changed shape; its analytics are left as they are")
        return False
    queue.ANALYTICS_MAX_EVENTS = min(queue.ANALYTICS_MAX_EVENTS, events)
    queue.ANAYLTICS_CACHE_FREQUENCY = max(queue.ANAYLTICS_CACHE_FREQUENCY, every)
    return True


def forget_finished_sessions(blocks: gr.Blocks) -> int:
    """Drop the sessions with no event pending and no message waiting; how many. (A
    synchronous sweep: no event can join a session half-way through it.)"""
    queue = getattr(blocks, "_queue", None)
    ids = getattr(queue, "pending_event_ids_session", None)
    messages = getattr(queue, "pending_messages_per_session", None)
    if not isinstance(ids, dict) or messages is None:
        return 0
    dropped = 0
    for session in [session for session, pending in ids.items() if not pending]:
        waiting = messages.get(session)
        if waiting is not None and not waiting.empty():
            continue
        del ids[session]
        messages.pop(session, None)
        dropped += 1
    return dropped


async def sweep_finished_sessions(blocks: gr.Blocks, every_s: float = 30.0) -> None:
    """Run :func:`forget_finished_sessions` every ``every_s`` seconds (a tier's lifespan task)."""
    while True:
        await asyncio.sleep(every_s)
        forget_finished_sessions(blocks)
