"""One limit of Gradio's queue that breaks replies under a crowd, raised on both tiers.

Gradio 6.31 keeps each session's pending messages in an ``LRUCache(2000)``
(``Queue.pending_messages_per_session``). Every REST call
(``/gradio_api/call/...``) is its own session, so with more than 2,000 calls in
flight the oldest session's messages are evicted while it still waits; its
event stream then finds no session and raises ``404`` after the response has
started, which the caller sees as a connection cut off mid-reply (the lost
requests of the first release's crowd benchmark). The cache bounds memory for
sessions that never read their messages; here it is sized to what a tier lets
in flight instead.

A Gradio internal: :func:`hold_sessions` checks the shape it expects and
leaves Gradio as it is (with a log line) when that shape changed;
``tests/test_gradio_tuning.py`` fails when it no longer applies.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("splitspace")


def hold_sessions(blocks: Any, sessions: int) -> bool:
    """Let the queue of ``blocks`` (after ``blocks.queue()``) hold ``sessions`` sessions'
    messages at once. True when applied."""
    cache = getattr(getattr(blocks, "_queue", None), "pending_messages_per_session", None)
    if cache is None or not isinstance(getattr(cache, "max_size", None), int):
        log.warning("Gradio's queue changed shape; its session limit is left as it is")
        return False
    cache.max_size = max(cache.max_size, sessions)
    return True
