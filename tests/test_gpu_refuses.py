"""The GPU tier trusts nothing it cannot verify: every refusal, checked against the real process."""

from __future__ import annotations

import time

import httpx
import pytest

from splitspace.session.identity import Identity
from tests.clients import GPU_ROUTES, infer_on_gpu_tier, infer_token, token_for
from tests.support import free_port, start_tier

WHO = Identity("key:alpha", "key", "free", "127.0.0.1")


def _calls(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith("splitspace_infer_calls_total"):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(params=GPU_ROUTES)
def route(request) -> str:
    """Both ways into the GPU tier refuse alike: Gradio's /infer and the direct route."""
    return request.param


def test_valid_token_is_served(tiny, route):
    final, result = infer_on_gpu_tier(tiny.backend.url, token_for(tiny.secret, WHO), route)
    assert final == "complete"
    assert result["info"]["client"] == "key:alpha"


@pytest.mark.parametrize(
    "token, message",
    [
        (None, "missing identity token"),
        ("forged.token.value", "not valid"),
    ],
)
def test_missing_or_garbage_token_refused(tiny, route, token, message):
    final, text = infer_on_gpu_tier(tiny.backend.url, token, route)
    assert final == "error"
    assert text.startswith("Unauthorized: ") and message in text


def test_token_signed_with_another_secret_refused(tiny, route):
    final, text = infer_on_gpu_tier(tiny.backend.url, token_for("not-the-shared-secret", WHO), route)
    assert final == "error" and "not valid" in text


def test_expired_token_refused(tiny, route):
    old = token_for(tiny.secret, WHO, clock=lambda: time.time() - 120)
    final, text = infer_on_gpu_tier(tiny.backend.url, old, route)
    assert final == "error" and "expired" in text


def test_invalid_request_refused_by_the_gpu_tier_too(tiny, route):
    final, text = infer_on_gpu_tier(tiny.backend.url, token_for(tiny.secret, WHO), route, width=100)
    assert final == "error" and text.startswith("Invalid request: width: must be a multiple of 8"), text


def test_direct_route_refuses_a_body_that_is_not_a_request(tiny):
    mint = token_for(tiny.secret, WHO)
    headers = lambda: {"x-splitspace-identity": infer_token(mint)}  # noqa: E731  (one token per call)
    url = f"{tiny.backend.url}/splitspace/v1/infer"
    r = httpx.post(url, content=b"not json", headers=headers())
    assert r.status_code == 422
    assert r.json() == {"title": "Invalid request", "field": "body", "message": "must be a JSON object"}
    r = httpx.post(url, json={"prompt": "a fox", "colour": "red"}, headers=headers())
    assert r.status_code == 422 and r.json()["field"] == "colour"
    r = httpx.post(url, content=b"{" + b" " * 70_000 + b"}", headers=headers())
    assert r.status_code == 413 and "bytes" in r.json()["message"]  # refused before it is read (shared/http/guard.py)


def test_a_token_is_good_for_its_own_request_once(tiny, route):
    """A captured token cannot be replayed, nor used for another prompt."""
    mint = token_for(tiny.secret, WHO)
    token = infer_token(mint, prompt="the prompt it was issued for")
    final, text = infer_on_gpu_tier(tiny.backend.url, token, route, prompt="another prompt")
    assert final == "error" and text == "Unauthorized: identity token was issued for another request", text
    fresh = infer_token(mint, prompt="a fox")
    assert infer_on_gpu_tier(tiny.backend.url, fresh, route, prompt="a fox")[0] == "complete"
    final, text = infer_on_gpu_tier(tiny.backend.url, fresh, route, prompt="a fox")
    assert final == "error" and "already used" in text, text


def test_run_route_that_skips_the_queue_is_closed(tiny):
    r = httpx.post(
        f"{tiny.backend.url}/gradio_api/run/infer",
        json={"data": ["x"]},
        headers={"x-splitspace-identity": infer_token(token_for(tiny.secret, WHO), prompt="x")},
    )
    assert r.status_code >= 400
    assert "image_png_b64" not in r.text


def test_refused_calls_spend_no_model_time(tiny, route):
    before = httpx.get(f"{tiny.backend.url}/metrics").text
    infer_on_gpu_tier(tiny.backend.url, None, route)
    after = httpx.get(f"{tiny.backend.url}/metrics").text

    def finished(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith('splitspace_requests_total{outcome="finished"}')]

    assert finished(before) == finished(after)


def test_retired_secret_verifies_until_dropped(tmp_path):
    port = free_port()
    env = {"SPLITSPACE_MODEL": "sleep:1", "SPLITSPACE_STATE_PATH": str(tmp_path / "s.sqlite3")}
    tier = start_tier("backend", port, {**env, "SPLITSPACE_SECRET": "new-secret,old-secret"}, tmp_path / "a.log")
    try:
        old_token = token_for("old-secret", WHO)
        assert infer_on_gpu_tier(tier.url, old_token)[0] == "complete"
        assert infer_on_gpu_tier(tier.url, token_for("new-secret", WHO), "direct")[0] == "complete"
    finally:
        tier.stop()
    tier = start_tier("backend", port, {**env, "SPLITSPACE_SECRET": "new-secret"}, tmp_path / "b.log")
    try:
        for route in GPU_ROUTES:
            final, text = infer_on_gpu_tier(tier.url, old_token, route)
            assert final == "error" and "not valid" in text
    finally:
        tier.stop()
    assert "old-secret" not in tier.log() and "new-secret" not in tier.log()


def test_no_secret_configured_refuses_everything(tmp_path):
    env = {"SPLITSPACE_MODEL": "sleep:1", "SPLITSPACE_STATE_PATH": str(tmp_path / "s.sqlite3"), "SPLITSPACE_SECRET": ""}
    tier = start_tier("backend", free_port(), env, tmp_path / "c.log")
    try:
        for route in GPU_ROUTES:
            final, text = infer_on_gpu_tier(tier.url, token_for("anything", WHO), route)
            assert final == "error" and "no SPLITSPACE_SECRET" in text
    finally:
        tier.stop()


def test_secrets_never_logged(tiny):
    for route in GPU_ROUTES:
        infer_on_gpu_tier(tiny.backend.url, token_for(tiny.secret, WHO), route)
    for log in (tiny.backend.log(), tiny.frontend.log()):
        assert tiny.secret not in log
        assert tiny.admin_token not in log
