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
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from mcp import ClientSession
from PIL import Image

from tests.conftest import QUOTAS, key
from tests.support import Deployment

try:  # mcp >= 1.24
    from mcp.client.streamable_http import streamable_http_client
except ImportError:  # pragma: no cover - older SDKs only have the (now deprecated) name
    streamable_http_client = None
    from mcp.client.streamable_http import streamablehttp_client

T = TypeVar("T")
PARAMS = ["prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed"]
SMALL = {"prompt": "a red fox", "negative_prompt": "", "width": 64, "height": 64, "steps": 1,
         "guidance_scale": 0.0, "seed": 5}


@pytest.fixture(scope="module")
def mcp_dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("mcp"), model="sleep:20", quotas=QUOTAS,
                   frontend_env={"SPLITSPACE_MCP": "1"})
    d.start()
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


async def _with_session(url: str, headers: dict[str, str], fn: Callable[[ClientSession], Awaitable[T]]) -> T:
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=120)) as http:
        if streamable_http_client is not None:
            transport = streamable_http_client(url, http_client=http)
        else:  # pragma: no cover
            transport = streamablehttp_client(url, headers=headers)
        async with transport as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await fn(session)


def with_session(d: Deployment, fn: Callable[[ClientSession], Awaitable[T]], headers: dict[str, str] | None = None) -> T:
    return asyncio.run(asyncio.wait_for(_with_session(mcp_url(d), headers or {}, fn), timeout=90))


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
    assert "width" in text and "multiple of 8" in text


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


async def _ignore(value: float, total: float | None, message: str | None) -> None:
    return None
