"""Malformed calls on either tier: a 4xx with ``{"title", "message"}`` naming what was wrong.

Each case here was a 5xx, a reply broken off mid-stream, or an accepted abuse on
the first release (issue 11): Gradio's routes, not splitspace's handlers, answered
them. Real tiers on loopback, real HTTP clients; the guard is ``shared/http/guard.py``
(its own tests in process: ``tests/test_guard_unit.py``).
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import httpx
import pytest

from splitspace.session.identity import Identity
from splitspace.shared.contract.calls import CALL_PATH
from tests.clients import call_rest, error_text, gen_args, generate_token, token_for
from tests.support import Deployment

TIERS = ["frontend", "backend"]
WHO = Identity("k", "key", "free", "1.2.3.4")
WITH_ENDPOINTS = ["frontend"]
"""The tiers whose Gradio app has endpoints (the GPU tier's has none: its calls and the
callers' standing come through its direct route)."""
API = {"frontend": ("generate", 7, "quota")}
"""Each such tier's main endpoint, its number of inputs, and its endpoint without inputs."""
BODY_PATH = {"frontend": "/gradio_api/call/generate", "backend": "/gradio_api/queue/join"}
"""A Gradio route of each tier that takes a JSON body."""


def url(d: Deployment, tier: str) -> str:
    return (d.frontend if tier == "frontend" else d.backend).url  # type: ignore[union-attr]


def assert_problem(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    doc = r.json()
    assert isinstance(doc.get("title"), str) and doc["title"], doc
    assert isinstance(doc.get("message"), str) and doc["message"], doc
    for word in words:
        assert word in doc["message"], (word, doc)
    return doc


@pytest.mark.parametrize("tier", WITH_ENDPOINTS)
def test_call_v2_missing_or_unknown_parameter_is_422_naming_it(direct: Deployment, tier: str) -> None:
    """First release: HTTP 500 (construct_args raised TypeError)."""
    base, (main, _, bare) = url(direct, tier), API[tier]
    r = httpx.post(f"{base}/gradio_api/call/v2/{main}", json={"prompt": "a fox", "colour": "red"})
    doc = assert_problem(r, 422, "'colour'", "unknown parameter")
    assert doc["title"] == "Invalid request"
    assert_problem(httpx.post(f"{base}/gradio_api/call/v2/{main}", json={"width": 64}), 422, "prompt", "required")
    assert_problem(httpx.post(f"{base}/gradio_api/call/v2/{bare}", json={"x": 1}), 422, "'x'", "unknown parameter")


@pytest.mark.parametrize("route", ["call", "call/v2", "run"])
def test_the_gpu_tiers_gradio_app_has_no_endpoint(direct: Deployment, route: str) -> None:
    """Its calls come through the call route (``/splitspace/v1/call``), its callers' standing
    through ``/splitspace/v1/standing``: Gradio's API serves nothing there."""
    base = url(direct, "backend")
    body: Any = {} if route == "call/v2" else {"data": []}
    for api in ("standing", "infer", "generate"):
        assert_problem(httpx.post(f"{base}/gradio_api/{route}/{api}", json=body), 404, f"'{api}'")
    assert [d["api_name"] for d in httpx.get(f"{base}/config").json()["dependencies"] if d.get("api_name")] == []


def test_call_v2_with_valid_parameters_still_runs(direct: Deployment) -> None:
    base = url(direct, "frontend")
    r = httpx.post(f"{base}/gradio_api/call/v2/generate", json={"prompt": "a fox", "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    with httpx.stream("GET", f"{base}/gradio_api/call/generate/{r.json()['event_id']}", timeout=30) as s:
        body = s.read().decode()
    assert "event: complete" in body, body[-500:]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("route", ["call", "call/v2", "run"])
def test_unknown_endpoint_is_404(direct: Deployment, tier: str, route: str) -> None:
    """First release: HTTP 500 (FnIndexInferError, KeyError)."""
    body: Any = {} if route == "call/v2" else {"data": []}
    r = httpx.post(f"{url(direct, tier)}/gradio_api/{route}/no_such_api", json=body)
    doc = assert_problem(r, 404, "'no_such_api'")
    assert doc["title"] == "Unknown endpoint"


@pytest.mark.parametrize("tier", WITH_ENDPOINTS)
def test_wrong_arity_is_422_on_call_run_and_join(direct: Deployment, tier: str) -> None:
    """First release: the call was queued and failed with a traceback listing every input
    (``/call/``, ``/queue/join``), or HTTP 500 (``/run/`` on the frontend)."""
    base, (main, arity, _) = url(direct, tier), API[tier]
    data = ["a fox", "", 64]
    assert_problem(
        httpx.post(f"{base}/gradio_api/call/{main}", json={"data": data}), 422, f"expected {arity} values, got 3"
    )
    fn_index = next(d["id"] for d in httpx.get(f"{base}/config").json()["dependencies"] if d.get("api_name") == main)
    join = {"data": data, "fn_index": fn_index, "session_hash": "s1"}
    assert_problem(httpx.post(f"{base}/gradio_api/queue/join", json=join), 422, f"expected {arity} values, got 3")
    assert_problem(httpx.post(f"{base}/gradio_api/run/{main}", json={"data": data}), 422, "got 3")


@pytest.mark.parametrize("tier", TIERS)
def test_unknown_fn_index_is_404(direct: Deployment, tier: str) -> None:
    """First release: HTTP 500 (KeyError in get_fn)."""
    r = httpx.post(f"{url(direct, tier)}/gradio_api/queue/join", json={"data": [], "fn_index": 99, "session_hash": "s"})
    assert_problem(r, 404, "fn_index", "99")


@pytest.mark.parametrize("tier", WITH_ENDPOINTS)
@pytest.mark.parametrize("body", [b"not json", b'{"data": "x"}', b"[1, 2]", b'{"data": [], "session_hash": 5}'])
def test_malformed_json_is_4xx_and_echoes_nothing_long(direct: Deployment, tier: str, body: bytes) -> None:
    base, (main, _, _) = url(direct, tier), API[tier]
    r = httpx.post(f"{base}/gradio_api/call/{main}", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert_problem(r, r.status_code)


@pytest.mark.parametrize("tier", WITH_ENDPOINTS)
@pytest.mark.parametrize(
    "path", ["call/{api}/no-such-event", "call/v2/{api}/no-such-event", "queue/data?session_hash=nobody"]
)
def test_unknown_event_stream_is_404_not_a_broken_reply(direct: Deployment, tier: str, path: str) -> None:
    """First release: an event stream cut off mid-response (ChunkedEncodingError)."""
    target = f"{url(direct, tier)}/gradio_api/" + path.format(api=API[tier][0])
    with httpx.Client(timeout=15) as c:
        r = c.get(target)  # reads the whole body: a broken reply raises here
    assert_problem(r, 404, "no event" if "call/" in path else "nobody")


def test_an_event_read_to_its_end_cannot_be_read_again(direct: Deployment) -> None:
    """A second read of a finished event's stream is a 404 (Gradio would stream heartbeats forever)."""
    base = direct.frontend.url  # type: ignore[union-attr]
    event_id = httpx.post(f"{base}/gradio_api/call/quota", json={"data": []}).json()["event_id"]
    with httpx.Client(timeout=30) as c:
        first = c.get(f"{base}/gradio_api/call/quota/{event_id}")
        assert "event: complete" in first.text, first.text
        assert_problem(c.get(f"{base}/gradio_api/call/quota/{event_id}"), 404, "no event")


@pytest.mark.parametrize("tier", TIERS)
def test_uploads_are_refused_on_both_tiers(direct: Deployment, tier: str) -> None:
    """First release: any upload of any size was stored (neither tier has a file input)."""
    base = url(direct, tier)
    r = httpx.post(f"{base}/gradio_api/upload", files={"files": ("a.bin", b"x" * 200_000)})
    assert_problem(r, 403, "no file uploads")
    malformed = httpx.post(
        f"{base}/gradio_api/upload",
        content=b"--zz\r\ngarbage",
        headers={"content-type": "multipart/form-data; boundary=zz"},
    )
    assert_problem(malformed, 403)  # first release: HTTP 500 for some malformed forms


@pytest.mark.parametrize("tier", WITH_ENDPOINTS)
def test_forms_are_refused(direct: Deployment, tier: str) -> None:
    r = httpx.post(f"{url(direct, tier)}/gradio_api/call/{API[tier][0]}", data={"data": "x"})
    assert_problem(r, 415, "JSON")


@pytest.mark.parametrize("tier", TIERS)
def test_a_body_over_the_limit_is_413_before_it_is_read(direct: Deployment, tier: str) -> None:
    """First release: a 50 MB JSON body was read and parsed (8 in parallel: +1.1 GB RSS)."""
    base, path = url(direct, tier), BODY_PATH[tier]
    big = {"data": ["x" * 1_000_000] + [""] * 6, "fn_index": 0, "session_hash": "s"}
    assert_problem(httpx.post(f"{base}{path}", json=big), 413, "at most")
    # Announced as 50 MB, nothing sent: the answer comes from the headers alone.
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * 2**20}\r\n\r\n".encode()
        )
        head = s.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head[:200]


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_eight_parallel_50_mb_bodies_do_not_grow_the_frontend(direct: Deployment) -> None:
    """First release: 226 MB to 1.3 GB RSS, and 1.1 GB stayed."""
    fe = direct.frontend
    assert fe is not None
    before = _rss_kb(fe.proc.pid)
    port = int(fe.url.rsplit(":", 1)[1])
    statuses: list[str] = []

    def flood() -> None:
        chunk = b"x" * 65536
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(
                b"POST /gradio_api/call/generate HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            try:
                for _ in range(800):  # 50 MB
                    s.sendall(b"10000\r\n" + chunk + b"\r\n")
            except OSError:
                pass  # the server answered and closed: what we want
            try:
                statuses.append(s.recv(64).decode("latin-1").split("\r\n")[0])
            except OSError:
                statuses.append("closed")

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    grown_mb = (_rss_kb(fe.proc.pid) - before) / 1024
    assert grown_mb < 50, f"the frontend grew by {grown_mb:.0f} MB"
    assert all(s.startswith("HTTP/1.1 413") or s in ("", "closed") for s in statuses), statuses
    assert any(s.startswith("HTTP/1.1 413") for s in statuses), statuses


def test_a_gradio_error_on_the_run_route_is_a_4xx_not_500(direct: Deployment) -> None:
    """First release: ``/gradio_api/run/generate`` answered a validation error with HTTP 500."""
    r = httpx.post(f"{direct.frontend.url}/gradio_api/run/generate", json={"data": gen_args(width=100)})  # type: ignore[union-attr]
    doc = assert_problem(r, 422, "Width", "steps of 8")  # the input by its label
    assert doc["title"] == "Invalid request" and "error" in doc  # Gradio's own key stays for its clients


@pytest.mark.parametrize("prompt", ["a \ud800 fox", "a \x00 fox"])
def test_prompt_must_be_utf8_text_without_nul(direct: Deployment, prompt: str) -> None:
    """First release: a lone surrogate passed validation and crashed the model (a traceback,
    and with batching, every other client's request in the batch)."""
    base = direct.frontend.url  # type: ignore[union-attr]
    with httpx.Client(timeout=30) as c:  # json.dumps escapes the surrogate as JSON allows ("\ud800")
        r = c.post(
            f"{base}/gradio_api/call/generate",
            content=json.dumps({"data": gen_args(prompt=prompt)}),
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 422, r.text[:300]  # refused at the POST, naming the input by its label
    text = "; ".join(v["message"] for v in r.json()["detail"] if v.get("is_valid") is False)
    assert text.startswith("Prompt: "), text
    assert ("UTF-8" in text) or ("NUL" in text), text
    assert "Traceback" not in direct.backend.log()  # type: ignore[union-attr]


def test_an_error_echoes_a_short_value_not_the_whole_input(direct: Deployment) -> None:
    """First release: a 1 MB ``width`` gave a 1 MB error (10 KB here: the body limit is 16 KiB)."""
    with httpx.Client(timeout=30) as c:
        final, events = call_rest(c, direct.frontend.url, "generate", gen_args(width="9" * 10_000))  # type: ignore[union-attr]
    assert final == "error"
    text = error_text(events)
    assert text.startswith("Width: must be a number") and len(text) < 200, text[:300]


# -- the limits of a body's JSON (issue 21) ----------------------------------------------------------
DEEP = b"[" * 5000 + b"]" * 5000
"""The attack: 10 KB of nesting. First release: HTTP 500, a traceback in the log, and the next
request on the same pooled connection failed (the server had closed it)."""
PARSER_LIMITS = [
    (DEEP, 413, "nesting deeper than 32 levels"),
    (b'{"data": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", 413, "nesting deeper than 32 levels"),
    (b'{"data": [' + b"9" * 5000 + b"]}", 413, "a number longer than 40 characters"),  # int(): past 4,300 digits
    (b'{"data": [1e999]}', 400, "out of range"),
    (b'{"data": [NaN, -Infinity]}', 400, "NaN or Infinity"),
    (b'{"data": [' + b"0," * 2000 + b"0]}", 413, "more than 1000 items"),
]
BODY_ROUTES = [
    ("frontend", "/gradio_api/call/generate"),
    ("frontend", "/gradio_api/call/v2/generate"),
    ("frontend", "/gradio_api/run/generate"),
    ("frontend", "/gradio_api/queue/join"),
    ("frontend", "/gradio_api/cancel"),
    ("backend", "/gradio_api/queue/join"),
    ("backend", CALL_PATH),
    ("backend", "/admin/ui/gradio_api/queue/join"),  # the operators' dashboard, before its login
]


class _Ports:
    """The local port of each response's connection: the same port is the same pooled connection."""

    def __init__(self) -> None:
        self.ports: list[int] = []

    def __call__(self, response: httpx.Response) -> None:
        self.ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])


@pytest.mark.parametrize(("tier", "path"), BODY_ROUTES, ids=[f"{t}:{p}" for t, p in BODY_ROUTES])
def test_a_body_past_the_parser_limits_is_a_4xx_naming_the_limit_and_the_connection_keeps_serving(
    direct: Deployment, tier: str, path: str
) -> None:
    proc = direct.frontend if tier == "frontend" else direct.backend
    assert proc is not None
    log_before = proc.log_path.stat().st_size
    headers = {"content-type": "application/json"}
    call_route = path == CALL_PATH
    ports = _Ports()
    with httpx.Client(timeout=30, event_hooks={"response": [ports]}) as c:
        for body, status, named in PARSER_LIMITS:
            if call_route:  # a valid identity token (one a call): the route reads the body after it
                headers["x-splitspace-identity"] = generate_token(token_for(direct.secret, WHO))
            # the call route holds a call's JSON line to its limits itself: a 422 naming its body
            expected = 422 if call_route else status
            assert_problem(c.post(f"{proc.url}{path}", content=body, headers=headers), expected, named)
            assert c.get(f"{proc.url}/health").status_code == 200
    assert len(set(ports.ports)) == 1, f"the pooled connection was not kept: local ports {ports.ports}"
    with open(proc.log_path, "rb") as f:
        f.seek(log_before)
        grown = f.read().decode(errors="replace")
    assert "Traceback" not in grown, grown[-3000:]
