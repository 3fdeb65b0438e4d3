"""The frontend's MCP server (``SPLITSPACE_MCP=1``), called with the official ``mcp`` SDK client.

Gradio serves it as streamable HTTP at ``/gradio_api/mcp/``; every public named endpoint
is a tool. A queued tool call is made by Gradio through a loopback ``gradio_client`` to
the frontend's own API with the MCP request's headers, so an ``Authorization: Bearer``
header on the MCP connection makes the caller that machine client.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from mcp import ClientSession
from PIL import Image

from tests.clients import call_rest
from tests.conftest import QUOTAS, key
from tests.support import Deployment

try:  # mcp >= 1.24
    from mcp.client.streamable_http import streamable_http_client
except ImportError:  # pragma: no cover - older SDKs only have the (now deprecated) name
    streamable_http_client = None
    from mcp.client.streamable_http import streamablehttp_client

T = TypeVar("T")
PARAMS = ["prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed"]
SMALL = {
    "prompt": "a red fox",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 1,
    "guidance_scale": 0.0,
    "seed": 5,
}


def start_mcp(workdir: Path) -> Deployment:
    """Both tiers with the frontend's MCP server on, reached directly (no trusted proxy)."""
    d = Deployment(workdir, model="sleep:20", quotas=QUOTAS, trusted_proxies=0, frontend_env={"SPLITSPACE_MCP": "1"})
    return d.start()


@pytest.fixture(scope="module")
def mcp_dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = start_mcp(tmp_path_factory.mktemp("mcp"))
    try:
        probe = httpx.get(mcp_url(d), timeout=10)  # a plain GET gets Gradio's MCP landing page
        assert probe.status_code == 200, (
            f"SPLITSPACE_MCP=1 but {mcp_url(d)} answers {probe.status_code}: the frontend serves no MCP server"
        )
        yield d
    finally:
        d.stop()


def mcp_url(d: Deployment) -> str:
    return f"{d.frontend.url}/gradio_api/mcp/"


async def _with_session(
    url: str, headers: dict[str, str], fn: Callable[[ClientSession], Awaitable[T]], local_address: str | None = None
) -> T:
    transport = httpx.AsyncHTTPTransport(local_address=local_address) if local_address else None
    # Like most MCP clients, keep no cookies: a caller is then its address (or its API key).
    no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    async with httpx.AsyncClient(
        headers=headers, timeout=httpx.Timeout(30, read=120), transport=transport, cookies=no_cookies
    ) as http:
        if streamable_http_client is not None:
            transport = streamable_http_client(url, http_client=http)
        else:  # pragma: no cover
            transport = streamablehttp_client(url, headers=headers)
        async with transport as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await fn(session)


def with_session(
    d: Deployment,
    fn: Callable[[ClientSession], Awaitable[T]],
    headers: dict[str, str] | None = None,
    local_address: str | None = None,
) -> T:
    """One MCP session; ``local_address``: call from this loopback address (127.0.0.x) instead of 127.0.0.1."""
    return asyncio.run(asyncio.wait_for(_with_session(mcp_url(d), headers or {}, fn, local_address), timeout=90))


def parse(result: Any) -> tuple[list[bytes], list[dict[str, Any]], str]:
    """(images, info dicts, all text) of a tool result.

    Gradio puts an image output in an ImageContent (plus an "Image URL: ..." text) and a
    dict output in a text item holding its Python repr.
    """
    images, infos, texts = [], [], []
    for item in result.content:
        if item.type == "image":
            images.append(base64.b64decode(item.data))
        elif item.type == "text":
            texts.append(item.text)
            try:
                value = ast.literal_eval(item.text)
            except (ValueError, SyntaxError):
                continue
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, dict) and "seed" in v:
                    infos.append(v)
    return images, infos, "\n".join(texts)


def test_mcp_lists_generate_and_quota_tools(mcp_dep: Deployment) -> None:
    async def tools(s: ClientSession) -> dict[str, Any]:
        return {t.name: t for t in (await s.list_tools()).tools}

    found = with_session(mcp_dep, tools)
    assert {"generate", "quota"} <= set(found)
    assert list(found["generate"].inputSchema["properties"]) == PARAMS


def test_generate_tool_requires_only_the_prompt(mcp_dep: Deployment) -> None:
    """The contract: every parameter but ``prompt`` has a default (``negative_prompt`` is "")."""

    async def schema(s: ClientSession) -> dict[str, Any]:
        return next(t for t in (await s.list_tools()).tools if t.name == "generate").inputSchema

    assert with_session(mcp_dep, schema).get("required", []) == ["prompt"]


def test_mcp_generate_returns_png_and_info(mcp_dep: Deployment) -> None:
    progress: list[str | None] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    async def call(s: ClientSession) -> Any:
        return await s.call_tool("generate", SMALL, progress_callback=on_progress)

    result = with_session(mcp_dep, call)
    assert not result.isError, result.content
    images, infos, _ = parse(result)
    assert len(images) == 1
    img = Image.open(io.BytesIO(images[0]))
    assert img.format == "PNG" and img.size == (64, 64)
    assert len(infos) == 1
    info = infos[0]
    assert info["seed"] == 5 and info["width"] == 64 and info["height"] == 64 and info["steps"] == 1
    assert progress  # a progress token gets Gradio's queue and processing updates


def test_mcp_generate_without_progress_token(mcp_dep: Deployment) -> None:
    """Without a progress token Gradio returns both outputs in one text item; the image is a URL."""

    async def call(s: ClientSession) -> Any:
        return await s.call_tool("generate", {**SMALL, "seed": 6})

    result = with_session(mcp_dep, call)
    assert not result.isError, result.content
    images, infos, text = parse(result)
    assert len(infos) == 1 and infos[0]["seed"] == 6
    urls = [u for u in _urls(text) if "/gradio_api/file=" in u]
    assert images or urls, text
    if not images:
        r = httpx.get(urls[0], timeout=10)
        r.raise_for_status()
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)


def _urls(text: str) -> list[str]:
    return re.findall(r"https?://[^\s'\"]+", text)


def test_mcp_caller_with_api_key_is_that_machine_client(mcp_dep: Deployment) -> None:
    async def call(s: ClientSession) -> Any:
        return await s.call_tool("generate", SMALL, progress_callback=_ignore)

    result = with_session(mcp_dep, call, headers={"Authorization": f"Bearer {key('alpha')}"})
    assert not result.isError, result.content
    _, infos, _ = parse(result)
    assert infos[0]["client"] == "key:alpha"


def test_mcp_quota_tool(mcp_dep: Deployment) -> None:
    async def call(s: ClientSession) -> Any:
        return await s.call_tool("quota", {})

    result = with_session(mcp_dep, call, headers={"Authorization": f"Bearer {key('beta')}"})
    assert not result.isError, result.content
    standing = ast.literal_eval(result.content[0].text)
    assert standing["tier"] == "pro" and standing["client"] == "key:beta"


def test_mcp_invalid_request_is_a_tool_error_naming_the_field(mcp_dep: Deployment) -> None:
    async def call(s: ClientSession) -> Any:
        return await s.call_tool("generate", {**SMALL, "width": 100}, progress_callback=_ignore)

    result = with_session(mcp_dep, call)
    assert result.isError
    text = " ".join(c.text for c in result.content if c.type == "text")
    assert "Width: must be in steps of 8" in text, text  # the input by its label, as for every client


def test_mcp_unknown_api_key_is_refused(mcp_dep: Deployment) -> None:
    async def call(s: ClientSession) -> Any:
        return await s.call_tool("generate", SMALL, progress_callback=_ignore)

    result = with_session(mcp_dep, call, headers={"Authorization": "Bearer not-a-key"})
    assert result.isError


def test_mcp_is_off_by_default(tiny: Deployment) -> None:
    r = httpx.post(
        f"{tiny.frontend.url}/gradio_api/mcp/",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Accept": "application/json, text/event-stream"},
    )
    assert r.status_code in (404, 405)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"[" * 5000 + b"]" * 5000, "nesting deeper than 32 levels"),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "generate", "arguments": '
            b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}}}",
            "nesting deeper than 32 levels",
        ),
        (b'{"jsonrpc": "2.0", "id": 1' + b"0" * 5000 + b', "method": "tools/list"}', "a number longer than 40"),
        (b'{"jsonrpc": "2.0", "id": NaN, "method": "tools/list"}', "NaN or Infinity"),
    ],
    ids=["deep", "deep-arguments", "long-id", "nan-id"],
)
def test_mcp_body_past_the_parser_limits_is_a_4xx_and_the_connection_keeps_serving(
    mcp_dep: Deployment, body: bytes, named: str
) -> None:
    """Issue 21: the MCP endpoint's bodies have the same limits as every other route."""
    fe = mcp_dep.frontend
    assert fe is not None
    log_before = fe.log_path.stat().st_size
    with httpx.Client(timeout=30) as c:
        r = c.post(
            mcp_url(mcp_dep),
            content=body,
            headers={"content-type": "application/json", "accept": "application/json, text/event-stream"},
        )
        assert r.status_code in (400, 413), (r.status_code, r.text[:300])
        doc = r.json()
        assert doc["title"] and named in doc["message"], doc
        assert c.get(mcp_url(mcp_dep)).status_code == 200  # the same pooled connection
    assert mcp_client_id(mcp_dep)  # and a real MCP client still works
    with open(fe.log_path, "rb") as f:
        f.seek(log_before)
        assert "Traceback" not in f.read().decode(errors="replace")


async def _ignore(value: float, total: float | None, message: str | None) -> None:
    return None


# -- issue 11: where MCP calls go, and who they are -----------------------------------------
async def _quota(s: ClientSession) -> Any:
    return await s.call_tool("quota", {})


def mcp_client_id(d: Deployment, headers: dict[str, str] | None = None, local_address: str | None = None) -> str:
    result = with_session(d, _quota, headers=headers, local_address=local_address)
    assert not result.isError, result.content
    return ast.literal_eval(result.content[0].text)["client"]


class Listener:
    """A TCP port that records every connection made to it (a host a caller might name)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fresh_mcp(mcp_dep: Deployment, tmp_path: Path) -> Iterator[Deployment]:
    """A frontend whose MCP server has taken no call yet (the first call decided, in the first
    release), on ``mcp_dep``'s GPU tier."""
    d = Deployment(
        tmp_path,
        secret=mcp_dep.secret,
        backend_port=mcp_dep.backend_port,
        quotas=QUOTAS,
        trusted_proxies=0,
        frontend_env={"SPLITSPACE_MCP": "1"},
    )
    d.write_quotas(QUOTAS)
    try:
        d.start_frontend()
        yield d
    finally:
        d.stop()


def test_the_first_mcp_caller_cannot_send_later_calls_elsewhere(fresh_mcp: Deployment) -> None:
    """First release: the first MCP call's X-Forwarded-Host decided where Gradio sent every later
    MCP call, with that caller's API key and cookies."""
    elsewhere = Listener()
    try:
        hostile = {"X-Forwarded-Host": f"127.0.0.1:{elsewhere.port}", "X-Forwarded-Proto": "http"}
        with_session(fresh_mcp, _quota, headers=hostile)
        later = with_session(fresh_mcp, _quota, headers={"Authorization": f"Bearer {key('alpha')}"})
        assert not later.isError, later.content
        assert ast.literal_eval(later.content[0].text)["client"] == "key:alpha"
        assert elsewhere.connections == 0, "an MCP call went to a host a caller named"
    finally:
        elsewhere.close()


def test_mcp_callers_cannot_choose_their_address(mcp_dep: Deployment) -> None:
    """First release: Gradio forwarded the caller's X-Forwarded-For on its loopback call and uvicorn
    believed it from 127.0.0.1: each call ran as a fresh address (12 of 12 against a quota of 6)."""
    seen = {mcp_client_id(mcp_dep, {"X-Forwarded-For": f"198.51.100.{i}"}, "127.0.0.5") for i in range(3)}
    assert seen == {"addr:127.0.0.5"}


def test_anonymous_mcp_callers_are_each_their_own_client(mcp_dep: Deployment) -> None:
    """First release: every anonymous MCP caller was ``addr:127.0.0.1`` (one spent everyone's quota)."""
    assert mcp_client_id(mcp_dep, local_address="127.0.0.6") == "addr:127.0.0.6"
    assert mcp_client_id(mcp_dep, local_address="127.0.0.7") == "addr:127.0.0.7"


def test_a_caller_stamp_sent_from_outside_is_not_believed(mcp_dep: Deployment) -> None:
    """The frontend's signed note of the caller's address (``X-Splitspace-Caller``) is replaced on the
    MCP request and believed only from loopback with a valid signature."""
    forged = {"X-Splitspace-Caller": "203.0.113.66.abc.def"}
    assert mcp_client_id(mcp_dep, forged, "127.0.0.8") == "addr:127.0.0.8"
    with httpx.Client(timeout=30) as c:  # a REST call with a forged stamp: not believed either
        final, events = call_rest(c, mcp_dep.frontend.url, "quota", [], forged)  # type: ignore[union-attr]
    assert final == "complete" and events[-1][1][0]["client"] == "addr:127.0.0.1"
