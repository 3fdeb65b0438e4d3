"""The GPU tier trusts nothing it cannot verify: every refusal, checked against the real process."""

from __future__ import annotations

import time

import httpx
import pytest

from splitspace.session.identity import Identity
from splitspace.shared.contract.calls import CALL_PATH
from tests.clients import gen_args, generate_on_gpu_tier, generate_token, token_for
from tests.support import free_port, start_tier

WHO = Identity("key:alpha", "key", "free", "127.0.0.1")


def _calls(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith("splitspace_calls_total"):
            return float(line.split()[-1])
    return 0.0


def test_valid_token_is_served(tiny):
    final, result = generate_on_gpu_tier(tiny.backend.url, token_for(tiny.secret, WHO))
    assert final == "complete"
    assert result["info"]["client"] == "key:alpha"


@pytest.mark.parametrize(
    "token, message",
    [
        (None, "missing identity token"),
        ("forged.token.value", "not valid"),
    ],
)
def test_missing_or_garbage_token_refused(tiny, token, message):
    final, text = generate_on_gpu_tier(tiny.backend.url, token)
    assert final == "error"
    assert text.startswith("Unauthorized: ") and message in text


def test_token_signed_with_another_secret_refused(tiny):
    final, text = generate_on_gpu_tier(tiny.backend.url, token_for("not-the-shared-secret", WHO))
    assert final == "error" and "not valid" in text


def test_expired_token_refused(tiny):
    old = token_for(tiny.secret, WHO, clock=lambda: time.time() - 120)
    final, text = generate_on_gpu_tier(tiny.backend.url, old)
    assert final == "error" and "expired" in text


def test_invalid_request_refused_by_the_gpu_tier_too(tiny):
    final, text = generate_on_gpu_tier(tiny.backend.url, token_for(tiny.secret, WHO), width=100)
    assert final == "error" and text.startswith("Invalid request: width: must be a multiple of 8"), text


def test_the_call_route_refuses_a_body_that_is_not_a_call(tiny):
    mint = token_for(tiny.secret, WHO)
    headers = lambda: {"x-splitspace-identity": generate_token(mint)}  # noqa: E731  (one token per call)
    url = f"{tiny.backend.url}{CALL_PATH}"
    r = httpx.post(url, content=b"not json", headers=headers())
    assert r.status_code == 422
    assert r.json() == {"title": "Invalid request", "field": "body", "message": "its JSON line cannot be read"}
    r = httpx.post(url, json={"endpoint": "generate"}, headers=headers())
    assert r.status_code == 422 and r.json()["field"] == "data", r.text
    r = httpx.post(url, json={"endpoint": "infer", "data": []}, headers=headers())
    assert r.status_code == 404 and "functions: generate" in r.json()["message"], r.text


def test_a_token_is_good_for_its_own_request_once(tiny):
    """A captured token cannot be replayed, nor used for another prompt."""
    mint = token_for(tiny.secret, WHO)
    token = generate_token(mint, prompt="the prompt it was issued for")
    final, text = generate_on_gpu_tier(tiny.backend.url, token, prompt="another prompt")
    assert final == "error" and text == "Unauthorized: identity token was issued for another request", text
    fresh = generate_token(mint, prompt="a fox")
    assert generate_on_gpu_tier(tiny.backend.url, fresh, prompt="a fox")[0] == "complete"
    final, text = generate_on_gpu_tier(tiny.backend.url, fresh, prompt="a fox")
    assert final == "error" and "already used" in text, text


def test_gradio_routes_that_skip_the_call_route_run_nothing(tiny):
    """The GPU tier's Gradio app has no endpoint: a signed call sent to Gradio's routes, not
    the call route, is refused and runs nothing."""
    headers = {"x-splitspace-identity": generate_token(token_for(tiny.secret, WHO))}
    for route in ("run", "call"):
        r = httpx.post(f"{tiny.backend.url}/gradio_api/{route}/generate", json={"data": gen_args()}, headers=headers)
        assert r.status_code == 404, r.text
        assert "seed" not in r.text


def test_refused_calls_spend_no_model_time(tiny):
    calls = _calls(tiny.backend.url)
    before = httpx.get(f"{tiny.backend.url}/metrics").text
    generate_on_gpu_tier(tiny.backend.url, None)
    after = httpx.get(f"{tiny.backend.url}/metrics").text
    assert _calls(tiny.backend.url) == calls + 1  # counted as it arrived, before any check

    def finished(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith('splitspace_requests_total{outcome="finished"}')]

    assert finished(before) == finished(after)


def test_retired_secret_verifies_until_dropped(tmp_path):
    port = free_port()
    env = {"SPLITSPACE_MODEL": "sleep:1", "SPLITSPACE_STATE_PATH": str(tmp_path / "s.sqlite3")}
    tier = start_tier("backend", port, {**env, "SPLITSPACE_SECRET": "new-secret,old-secret"}, tmp_path / "a.log")
    try:
        old_token = token_for("old-secret", WHO)
        assert generate_on_gpu_tier(tier.url, old_token)[0] == "complete"
        assert generate_on_gpu_tier(tier.url, token_for("new-secret", WHO))[0] == "complete"
    finally:
        tier.stop()
    tier = start_tier("backend", port, {**env, "SPLITSPACE_SECRET": "new-secret"}, tmp_path / "b.log")
    try:
        final, text = generate_on_gpu_tier(tier.url, old_token)
        assert final == "error" and "not valid" in text
    finally:
        tier.stop()
    assert "old-secret" not in tier.log() and "new-secret" not in tier.log()


def test_no_secret_configured_refuses_everything(tmp_path):
    env = {"SPLITSPACE_MODEL": "sleep:1", "SPLITSPACE_STATE_PATH": str(tmp_path / "s.sqlite3"), "SPLITSPACE_SECRET": ""}
    tier = start_tier("backend", free_port(), env, tmp_path / "c.log")
    try:
        final, text = generate_on_gpu_tier(tier.url, token_for("anything", WHO))
        assert final == "error" and "no SPLITSPACE_SECRET" in text
    finally:
        tier.stop()


def test_secrets_never_logged(tiny):
    generate_on_gpu_tier(tiny.backend.url, token_for(tiny.secret, WHO))
    for log in (tiny.backend.log(), tiny.frontend.log()):
        assert tiny.secret not in log
        assert tiny.admin_token not in log
