"""The frontend's core (``cpu_frontend/core.py``) in process: a plain class that takes a
Starlette request and raises the project's errors, and the Gradio edge (``app.py``) that
unwraps ``gr.Request`` and maps those errors to ``gr.Error`` once.

The GPU tier is ``MockTransport`` running ``tests/apps/studio.py``'s functions in process;
the same paths through real processes: ``test_app_tiers.py``.
"""

from __future__ import annotations

import ast
import asyncio
import sys
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from starlette.requests import Request

from splitspace.cpu_frontend import core as core_module
from splitspace.cpu_frontend.app import Frontend, http_request
from splitspace.cpu_frontend.core import FrontendCore
from splitspace.cpu_frontend.hop.mock_transport import MockTransport
from splitspace.shared.app.loader import GpuEndpoint, gpu_endpoints, load_app
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.errors import SplitspaceError, Unauthorized
from splitspace.shared.contract.hop import Status

REPO = Path(__file__).resolve().parent.parent
STUDIO = str(REPO / "tests/apps/studio.py")
SECRET = "frontend-core-secret"


def starlette_request(headers: dict[str, str] | None = None, host: str = "203.0.113.7") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw, "client": (host, 5000)})


@pytest.fixture
def endpoints() -> Iterator[dict[str, GpuEndpoint]]:
    sys.modules.pop("studio", None)
    yield {e.api_name: e for e in gpu_endpoints(load_app(STUDIO))}
    sys.modules.pop("studio", None)


@pytest.fixture
def frontend(endpoints: dict[str, GpuEndpoint], tmp_path: Path) -> Frontend:
    settings = Settings(secret=SECRET, app=STUDIO, state_path=tmp_path / "state.sqlite3")
    return Frontend(settings, [MockTransport(functions=list(endpoints.values()))])


async def drain(updates: AsyncGenerator[Any, None]) -> list[Any]:
    return [update async for update in updates]


def test_the_core_module_imports_no_gradio() -> None:
    tree = ast.parse(Path(core_module.__file__).read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert modules, "no imports found: the check reads the wrong file"
    assert not [m for m in modules if m.split(".")[0] in ("gradio", "gradio_client")], modules


def test_the_core_follows_a_call_from_a_starlette_request(
    frontend: Frontend, endpoints: dict[str, GpuEndpoint]
) -> None:
    core: FrontendCore = frontend.core
    updates = asyncio.run(drain(core.follow_call(endpoints["stats"], ["hello"], starlette_request())))
    assert updates[-1] == ["HELLO", 5]
    assert all(isinstance(u, Status) for u in updates[:-1])
    assert core.identity(starlette_request()).client_id == "addr:203.0.113.7"


def test_the_core_raises_the_projects_error_and_the_gradio_edge_maps_it_once(
    frontend: Frontend, endpoints: dict[str, GpuEndpoint]
) -> None:
    with pytest.raises(SplitspaceError) as raised:
        asyncio.run(drain(frontend.core.follow_call(endpoints["fussy"], ["bad"], starlette_request())))
    assert not isinstance(raised.value, gr.Error)
    assert (raised.value.title, raised.value.message) == ("Fussy", "no bad words here")

    request = gr.Request(request=starlette_request())
    with pytest.raises(gr.Error) as mapped:
        asyncio.run(drain(frontend.follow_call(endpoints["fussy"], ["bad"], request)))
    assert (mapped.value.title, mapped.value.message) == ("Fussy", "Fussy: no bad words here")
    assert mapped.value.__suppress_context__  # raised `from None`: nothing to read back from it


def test_no_request_and_a_bad_key_are_refused_by_the_core_and_worded_by_the_edge(frontend: Frontend) -> None:
    with pytest.raises(SplitspaceError, match="no request context"):
        frontend.core.identity(None)
    with pytest.raises(Unauthorized):
        frontend.core.identity(starlette_request({"authorization": "Bearer sk-nobody"}))
    with pytest.raises(gr.Error) as mapped:
        asyncio.run(frontend.quota(None))  # type: ignore[arg-type]
    assert mapped.value.message == "Error: no request context"


def test_the_edge_unwraps_a_gr_request_or_rebuilds_one_made_of_attributes() -> None:
    inner = starlette_request({"x-test": "1"})
    assert http_request(gr.Request(request=inner)) is inner
    assert http_request(None) is None
    rebuilt = http_request(gr.Request(headers={"X-Test": "2"}, client={"host": "198.51.100.9", "port": 1}))
    assert rebuilt is not None
    assert rebuilt.headers["x-test"] == "2"
    assert rebuilt.client is not None and rebuilt.client.host == "198.51.100.9"
