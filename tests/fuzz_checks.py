"""schemathesis hooks for ``tests/test_fuzz.py`` (loaded through ``SCHEMATHESIS_HOOKS``).

One check beside schemathesis' own: a Gradio event stream (``text/event-stream``)
must end cleanly, with a last ``complete`` or ``error`` event, and every
``error`` event must carry a JSON object with a ``title``, so that a caller can
tell what went wrong. (Broken-off replies never reach a check: schemathesis
reports them as network errors, which the test counts from the report.)

One header beside what schemathesis sends, for the GPU tier's own routes
(``fuzz_gpu_tier.json``): with ``SPLITSPACE_FUZZ_SECRET`` set, each request carries a fresh
signed identity token, bound to the call in its body when the body is one (else to nothing
it could be), so fuzzed bodies reach the call route's reader, the validation and the
runner, not only the token check.

One body generator beside schemathesis' own (issue 21): about one body in
:data:`ODD_SHARE` is sent past a parser limit, as raw bytes (schemathesis sends
bytes as they are), since a JSON encoder cannot write most of them: the body nested
in up to 6,000 levels of arrays or objects (closed or not), or one of its values
replaced by a number literal of thousands of digits, ``NaN``, ``Infinity``,
``1e999``, or thousands of items.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import threading
from typing import Any

import schemathesis
from hypothesis import strategies as st

CHECK_NAME = "gradio_stream_ends_cleanly"

# CPython 3.11 as installed here (gh-106905, fixed in later releases): ``ast.parse`` in two
# threads at once can fail with "SystemError: AST constructor recursion depth mismatch".
# schemathesis' two workers are threads, and hypothesis parses the source of each lambda it
# describes; on a busy machine (the suite on several workers) both fuzz runs failed so.
# One parse at a time:
_parse, _parsing = ast.parse, threading.Lock()


def _one_parse_at_a_time(*args: Any, **kwargs: Any) -> Any:
    with _parsing:
        return _parse(*args, **kwargs)


ast.parse = _one_parse_at_a_time  # type: ignore[assignment]


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


@schemathesis.hook
def before_call(ctx, case, **kwargs):  # type: ignore[no-untyped-def]
    """A fresh identity token for the GPU tier (with ``SPLITSPACE_FUZZ_SECRET``)."""
    secret = os.environ.get("SPLITSPACE_FUZZ_SECRET")
    if not secret:
        return
    from splitspace.session.identity import Identity
    from splitspace.session.token import STANDING, IdentityTokens, call_purpose
    from splitspace.shared.contract.calls import Call
    from splitspace.shared.contract.headers import IDENTITY_HEADER

    purpose = STANDING if case.path.endswith("/standing") else call_purpose("none")
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("endpoint"), str) and isinstance(body.get("data"), list):
        with contextlib.suppress(TypeError, ValueError):
            purpose = call_purpose(Call(body["endpoint"], body["data"]).digest())
    token = IdentityTokens([secret]).mint(Identity("fuzz", "key", "fuzz", "127.0.0.1"), purpose)
    case.headers = {**(case.headers or {}), IDENTITY_HEADER: token}


ODD_SHARE = 4
"""One generated body in about this many is made odd."""
LIMIT_NAMED = "the body has "
"""How the guard's refusal of an odd body begins (``shared/http/guard.py``): the test counts them."""
_MARK = "__splitspace_odd__"


def _nested(doc: bytes) -> st.SearchStrategy[bytes]:
    depth = st.sampled_from([33, 999, 1000, 2500, 6000])  # just past the limit; where parsers recurse out
    arrays = depth.map(lambda n: b"[" * n + doc + b"]" * n)
    objects = depth.map(lambda n: b'{"a":' * n + doc + b"}" * n)
    unclosed = depth.map(lambda n: b"[" * n + doc)
    return st.one_of(arrays, objects, unclosed)


def _odd_value(body: Any) -> st.SearchStrategy[bytes]:
    literals = st.one_of(
        st.sampled_from([41, 4300, 4301, 6000]).map(lambda n: b"9" * n),  # int(): ValueError past 4,300
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1E+400"]),
        st.sampled_from([1001, 3000]).map(lambda n: b"0," * n + b"0"),
    )
    if isinstance(body, dict) and body:
        key = next(iter(body))
        template = json.dumps({**body, key: [_MARK]}, default=str).encode()
    else:
        template = json.dumps([_MARK]).encode()
    return literals.map(lambda literal: template.replace(json.dumps(_MARK).encode(), literal))


@schemathesis.hook
def flatmap_body(ctx, body):  # type: ignore[no-untyped-def]
    """The body as generated, or (about one in ODD_SHARE) the same body past a parser limit."""
    try:
        doc = json.dumps(body, default=str).encode()
    except (TypeError, ValueError):
        return st.just(body)
    odd = st.one_of(_nested(doc), _odd_value(body))
    return st.integers(0, ODD_SHARE - 1).flatmap(lambda pick: odd if pick == 0 else st.just(body))
