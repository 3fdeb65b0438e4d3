"""The guard in process (``shared/http/guard.py``): its endpoint table, and the safety net behind its checks."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import gradio as gr
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitspace.shared.http.guard import EndpointTable, GradioGuard, titled_error_events
from splitspace.shared.http.json_limits import JsonLimitExceeded, JsonLimits
from tests.support import serve_in_thread
from tests.test_guard import assert_problem


def test_endpoint_table_comes_from_the_blocks() -> None:
    def two(a: str, b: int = 1) -> str:
        return a * b

    with gr.Blocks() as blocks:
        text, number, state, out = gr.Textbox(), gr.Number(), gr.State(), gr.Textbox()
        gr.Button().click(lambda a, b, s: a, [text, number, state], out, api_name="with_state")
        gr.api(two, api_name="two")
    blocks.queue()
    table = EndpointTable.from_blocks(blocks)
    with_state, api = table.by_name["with_state"], table.by_name["two"]
    assert (with_state.inputs, with_state.api_inputs) == (3, 2)  # the State is not an API input
    assert api.parameters == (("a", False), ("b", True)) and api.inputs == 2
    assert table.by_index[api.fn_index] is api


async def _fails_mid_stream(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/sse":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'event: error\ndata: "gone"\n\n', "more_body": True})
        raise RuntimeError("the stream broke")
    if scope["path"] == "/json":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise RuntimeError("the body broke")
    raise RuntimeError("before any reply")


class _NoBlocks:
    fns: dict[int, Any] = {}
    blocks: dict[int, Any] = {}


def test_an_exception_after_the_reply_started_ends_it_cleanly() -> None:
    """An event stream ends with a titled ``event: error``; other replies end, unbroken; an
    exception before any reply is a JSON 500, not a traceback page."""
    app = GradioGuard(_fails_mid_stream, blocks=_NoBlocks())
    with serve_in_thread(app) as base, httpx.Client(timeout=10) as c:
        sse = c.get(f"{base}/sse")  # would raise RemoteProtocolError on a broken reply
        blocks = [b for b in sse.text.split("\n\n") if b]
        assert blocks[-1].startswith("event: error")
        assert json.loads(blocks[-1].split("data: ", 1)[1])["title"]
        assert c.get(f"{base}/json").status_code == 200
        assert_problem(c.get(f"{base}/other"), 500)


def test_error_events_get_a_title() -> None:
    chunk = b'event: error\ndata: "Server stopped unexpectedly."\n\n'
    data = json.loads(titled_error_events(chunk).split(b"data: ", 1)[1])
    assert data["title"] and data["error"] == "Server stopped unexpectedly."
    untitled = b'event: error\ndata: {"error": null}\n\n'
    assert json.loads(titled_error_events(untitled).split(b"data: ", 1)[1])["title"]
    titled = b'event: error\ndata: {"error": "x", "title": "Queue full"}\n\n'
    assert titled_error_events(titled) == titled
    assert titled_error_events(b"event: complete\ndata: [1]\n\n") == b"event: complete\ndata: [1]\n\n"


def test_a_slow_body_is_refused_with_408() -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = GradioGuard(echo, blocks=_NoBlocks(), body_timeout_s=1.0)
    with serve_in_thread(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            started = time.monotonic()
            head = s.recv(4096).decode("latin-1")
        assert head.startswith("HTTP/1.1 408"), head[:200]
        assert time.monotonic() - started < 5


# -- the limits of a body's JSON (issue 21: 10 KB of "[" was a 500 and a traceback) ---------------
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),  # any text: quotes, backslashes, brackets, "NaN", "1e999"
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)


def _depth(value: Any) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(_depth, children), default=0)


def _items(value: Any) -> int:
    """What the limit counts: each container's items (at least one: itself) and its children's."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else max(len(children), 1) + sum(map(_items, children))


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES, st.sampled_from([None, 1]), st.booleans())
def test_json_limits_measure_depth_and_items_as_a_parser_sees_them(
    value: Any, indent: int | None, ascii_only: bool
) -> None:
    """Whatever the strings hold, and however the JSON is spaced or escaped: a body is refused
    exactly when it nests deeper than the limit or has more items, naming one it breaks."""
    limits = JsonLimits(max_depth=3, max_items=12)
    body = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    broken = [
        name
        for name, over in (
            ("nesting deeper than 3 levels", _depth(value) > 3),
            ("more than 12 items", _items(value) > 12),
        )
        if over
    ]
    try:
        limits.check(body)
    except JsonLimitExceeded as exc:
        assert any(exc.message.startswith(name) for name in broken), (exc.message, broken, body[:200])
    else:
        assert not broken, (broken, body[:200])


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"[" * 5000 + b"]" * 5000, "nesting deeper than 32 levels"),  # the attack: RecursionError in every parser
        (b'{"a":' * 33 + b"1" + b"}" * 33, "nesting deeper than 32 levels"),
        (b"[" * 16000, "nesting deeper than 32 levels"),  # never closed: parsers recurse before they see that
        (b"[" + b"[[]]," * 400 + b"0]", "more than 1000 items"),  # 401 + 800 containers' own
        (b"[" + b'"",' * 3000 + b"0]", "more than 1000 items"),
        (b'{"data": [' + b"9" * 5000 + b"]}", "a number longer than 40 characters"),  # int(): ValueError past 4,300
        (b'{"data": [-1E+400]}', "a number out of range"),
        (b'{"data": [1e999]}', "a number out of range"),
        (b'{"data": [NaN]}', "NaN or Infinity"),
        (b'{"data": [-Infinity]}', "NaN or Infinity"),
        (b'["' + b"x" * 40_000 + b'"]', "a string longer than 32768 bytes"),
        (b"[[[]]]]]", "brackets that do not balance"),
    ],
    ids=lambda v: v[:24].decode() if isinstance(v, bytes) else None,
)
def test_json_limits_name_what_a_body_breaks(body: bytes, named: str) -> None:
    with pytest.raises(JsonLimitExceeded) as caught:
        JsonLimits().check(body)
    assert caught.value.message.startswith(named), caught.value.message


def test_every_call_of_gradio_clients_fits_the_limits() -> None:
    """What gradio_client, @gradio/client, the page and an MCP client send, at their largest:
    a queue join with a file payload, the page's call with a full history of thumbnails
    (noise images: about 11 KB each), an MCP tool call; and numbers at their extremes."""
    fox = ["a fox " * 166, "", 1024, 1024, 50, 20.0, 2**63 - 1]
    file_data = {
        "path": "/tmp/a.png",
        "url": None,
        "size": 123,
        "orig_name": "a.png",
        "mime_type": "image/png",
        "is_stream": False,
        "meta": {"_type": "gradio.FileData"},
    }
    history = [
        {
            "prompt": "\U0001f98a" * 1000,
            "negative_prompt": "",
            "seed": 2**32,
            "width": 512,
            "height": 512,
            "steps": 4,
            "guidance_scale": 0.0,
            "gpu_s": 0.123456789,
            "thumb": "data:image/jpeg;base64," + "A" * 11_000,
        }
    ] * 12
    bodies = [
        {"data": [*fox, file_data], "fn_index": 3, "session_hash": "abc", "event_data": None, "trigger_id": 12},
        {
            "data": [*fox, history],
            "fn_index": 4,
            "session_hash": "abc",
            "event_data": {"index": [1, 2], "value": None},
            "trigger_id": 7,
        },
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {
                "name": "generate",
                "arguments": dict(zip("abcdefg", fox, strict=True)),
                "_meta": {"progressToken": 3},
            },
        },
        [1.7976931348623157e308, 5e-324, -0.0, 2**128, -(2**128), "NaN", "1e999", "[[[[[[[["],
    ]
    for doc in bodies:
        for ascii_only in (True, False):
            JsonLimits().check(json.dumps(doc, ensure_ascii=ascii_only).encode())


def test_json_limits_must_be_ones_every_parser_takes() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        JsonLimits(max_depth=1000)  # Python's json fails near 1,000 levels, pydantic-core at 200
    with pytest.raises(ValueError):
        JsonLimits(max_items=0)


def test_the_guard_refuses_a_body_past_the_limits_and_the_connection_serves_the_next() -> None:
    """Every path, known to the guard or not (here: an app that parses what it is given, as
    Starlette's ``Request.json`` does): first release, a 500 from the RecursionError."""
    seen: list[bytes] = []

    async def parse(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        payload = json.dumps({"items": len(json.loads(body)) if body else 0}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    app = GradioGuard(parse, blocks=_NoBlocks())
    with serve_in_thread(app) as base, httpx.Client(timeout=10) as c:
        deep = c.post(f"{base}/any/route", content=b"[" * 5000 + b"]" * 5000)
        assert_problem(deep, 413, "nesting deeper than 32 levels")
        assert_problem(c.post(f"{base}/any/route", content=b"[NaN]"), 400, "NaN")
        ok = c.post(f"{base}/any/route", json=[1, 2, 3])
        assert ok.status_code == 200 and ok.json() == {"items": 3}
        assert seen == [b"[1,2,3]"]  # the app never saw a refused body
