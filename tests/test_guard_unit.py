"""The guard in process (``shared/guard.py``): its endpoint table, and the safety net behind its checks."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import gradio as gr
import httpx

from splitspace.shared.guard import EndpointTable, GradioGuard, titled_error_events
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
