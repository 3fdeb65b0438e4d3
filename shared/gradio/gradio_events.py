"""Whether the Gradio event a handler serves still has its client, read from Gradio's queue.

Gradio notices a client that went away (its event stream closed) at once and marks the
event dead (``Event.alive``, set by ``Queue.clean_events``), but a handler that is an
async generator learns of it only at its next yield, when Gradio stops asking for more.
A handler waiting on the GPU tier for the next chunk of a slow stream would hold the GPU
until then; :func:`event_liveness` lets it look now and then instead and close the call.

A Gradio internal (6.31: ``LocalContext.blocks``, ``LocalContext.event_id``,
``Queue.event_ids_to_events``): when the shape is not the expected one there is no check
(None), and the handler falls back on Gradio's own next-yield check.
"""

from __future__ import annotations

from collections.abc import Callable


def event_liveness() -> Callable[[], bool] | None:
    """A check of whether the event being handled still has its client (None: Gradio's queue
    is not the shape expected). Call it in the handler's body (where Gradio has set its
    context); the check may be called anywhere."""
    from gradio.context import LocalContext

    blocks = LocalContext.blocks.get(None)
    event_id = LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    event = events.get(event_id) if isinstance(events, dict) and event_id else None
    if event is None or not isinstance(getattr(event, "alive", None), bool):
        return None
    return lambda: bool(event.alive)


def in_queue() -> bool:
    """Whether the handler serves an event of Gradio's queue (it has an event id). A direct
    call (``POST /run/<api>``, ``/api/<api>``) has none, and Gradio answers it with the
    handler's first yield alone ("only the queue continues a generator"): such a handler
    must yield nothing before its outputs. Call it in the handler's body."""
    from gradio.context import LocalContext

    return LocalContext.event_id.get(None) is not None
