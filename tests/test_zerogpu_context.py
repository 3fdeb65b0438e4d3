"""ZeroGPU charges each visitor's own quota only if ``@spaces.GPU`` finds that visitor's
``x-ip-token`` in Gradio's request context: ``spaces`` reads it from
``spaces.utils.gradio_request_var()``. ZeroGPU's scheduler cannot run here, so the GPU
tier runs in this process with a model that records what that variable holds when the
GPU function runs; the frontends are real processes, called as a visitor's browser is.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from spaces.utils import gradio_request_var

from tests.clients import call_rest, gen_args
from tests.support import free_port, serve_gpu_tier, start_tier

SECRET = "zerogpu-context-test-secret"


@pytest.fixture(scope="module")
def gpu_tier(tmp_path_factory) -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []

    def recording(generate):  # type: ignore[no-untyped-def]
        def generate_and_record(req, seed):  # type: ignore[no-untyped-def]
            request = gradio_request_var().get(None)
            seen.append(request.headers.get("x-ip-token") if request is not None else None)
            return generate(req, seed)

        return generate_and_record

    with serve_gpu_tier(tmp_path_factory.mktemp("zerogpu"), SECRET, recording) as url:
        yield url, seen


def test_the_gpu_function_sees_the_visitors_ip_token(gpu_tier, tmp_path):
    url, seen = gpu_tier
    env = {"SPLITSPACE_SECRET": SECRET, "SPLITSPACE_BACKEND_URL": url}
    frontend = start_tier("frontend", free_port(), env, tmp_path / "frontend.log")
    try:
        token = "visitor-token"
        with httpx.Client(timeout=60) as c:
            final, events = call_rest(c, frontend.url, "generate", gen_args(), {"x-ip-token": token})
            assert final == "complete", events
            assert seen[-1] == token
            # A visitor without one: the GPU function must not see the previous visitor's token.
            final, events = call_rest(c, frontend.url, "generate", gen_args())
            assert final == "complete", events
            assert seen[-1] is None
    finally:
        frontend.stop()
