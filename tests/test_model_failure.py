"""A model that fails: the caller gets "GPU error" naming no internals, and the GPU keeps serving.

The GPU tier runs in this process around a model that raises for one prompt (a real
model cannot be made to fail on demand here); calls go through its call route and
through a real frontend process.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from splitspace.session.identity import Identity
from tests.clients import call_rest, error_text, gen_args, generate_on_gpu_tier, token_for
from tests.support import free_port, serve_gpu_tier, start_tier

SECRET = "model-failure-test-secret"
WHO = Identity("key:alpha", "key", "free", "127.0.0.1")


@pytest.fixture(scope="module")
def gpu_tier(tmp_path_factory) -> Iterator[str]:
    def failing(generate):  # type: ignore[no-untyped-def]
        def generate_or_fail(req, seed):  # type: ignore[no-untyped-def]
            if req.prompt == "fail":
                raise RuntimeError("CUDA out of memory at /secret/path/model.py")
            return generate(req, seed)

        return generate_or_fail

    with serve_gpu_tier(tmp_path_factory.mktemp("failure"), SECRET, failing) as url:
        yield url


def test_a_model_failure_is_a_gpu_error_and_the_next_call_runs(gpu_tier):
    token = token_for(SECRET, WHO)
    final, text = generate_on_gpu_tier(gpu_tier, token, prompt="fail")
    # the built-in is an app: its failure is worded as any app function's (the type only)
    assert final == "error" and text == "GPU error: the function failed (RuntimeError)", text
    assert "secret" not in text and "CUDA" not in text
    assert generate_on_gpu_tier(gpu_tier, token)[0] == "complete"


def test_the_public_api_names_the_failure_without_internals(gpu_tier, tmp_path):
    env = {"SPLITSPACE_SECRET": SECRET, "SPLITSPACE_BACKEND_URL": gpu_tier}
    frontend = start_tier("frontend", free_port(), env, tmp_path / "frontend.log")
    try:
        with httpx.Client(timeout=60) as c:
            final, events = call_rest(c, frontend.url, "generate", gen_args(prompt="fail"))
            # the built-in is an app: its failure is worded as any app function's (the type only)
            assert final == "error" and error_text(events) == "GPU error: the function failed (RuntimeError)", events
            assert "secret" not in error_text(events) and "CUDA" not in error_text(events)
            assert call_rest(c, frontend.url, "generate", gen_args())[0] == "complete"
    finally:
        frontend.stop()
