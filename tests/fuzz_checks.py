"""schemathesis hooks for ``tests/test_fuzz.py`` (loaded through ``SCHEMATHESIS_HOOKS``).

One check beside schemathesis' own: a Gradio event stream (``text/event-stream``)
must end cleanly, with a last ``complete`` or ``error`` event, and every
``error`` event must carry a JSON object with a ``title``, so that a caller can
tell what went wrong. (Broken-off replies never reach a check: schemathesis
reports them as network errors, which the test counts from the report.)
"""

from __future__ import annotations

import json

import schemathesis

CHECK_NAME = "gradio_stream_ends_cleanly"


def parse_events(body: bytes) -> list[tuple[str, str]]:
    """``(event, data)`` pairs of an SSE body (``event`` is "" when a block names none)."""
    events = []
    for block in body.decode("utf-8", "replace").split("\n\n"):
        name, data = "", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if name or data:
            events.append((name, "\n".join(data)))
    return events


@schemathesis.check
def gradio_stream_ends_cleanly(ctx, response, case):  # type: ignore[no-untyped-def]
    content_type = (response.headers.get("content-type") or [""])[0]
    if not content_type.startswith("text/event-stream") or response.stream_cut_short:
        return None
    events = [e for e in parse_events(response.content) if e[0] != "heartbeat"]
    if not events:
        raise AssertionError("the event stream ended without an event")
    last = events[-1][0]
    if last not in ("complete", "error"):
        raise AssertionError(f"the event stream ended with {last or 'an unnamed event'!r}, not complete or error")
    for name, data in events:
        if name != "error":
            continue
        try:
            doc = json.loads(data)
        except ValueError:
            raise AssertionError(f"an error event whose data is not JSON: {data[:80]!r}") from None
        if not (isinstance(doc, dict) and isinstance(doc.get("title"), str) and doc["title"]):
            raise AssertionError(f"an error event without a title: {data[:80]!r}")
    return None
