"""The GPU tier trusts nothing it cannot verify: every refusal, checked against the real process."""

from __future__ import annotations

import time

import httpx
import pytest

from session.identity import Identity
from tests.clients import error_text, infer_direct, token_for
from tests.support import free_port, start_tier

WHO = Identity("key:alpha", "key", "free", "127.0.0.1")


def _calls(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith("splitspace_infer_calls_total"):
            return float(line.split()[-1])
    return 0.0


def test_valid_token_is_served(tiny):
    final, events = infer_direct(tiny.backend.url, token_for(tiny.secret, WHO))
    assert final == "complete"
    assert events[-1][1][0]["info"]["client"] == "key:alpha"


@pytest.mark.parametrize(
    "token, message",
    [
        (None, "missing identity token"),
        ("forged.token.value", "not valid"),
    ],
)
def test_missing_or_garbage_token_refused(tiny, token, message):
    final, events = infer_direct(tiny.backend.url, token)
    assert final == "error"
    assert "Unauthorized" in error_text(events) and message in error_text(events)


def test_token_signed_with_another_secret_refused(tiny):
    final, events = infer_direct(tiny.backend.url, token_for("not-the-shared-secret", WHO))
    assert final == "error" and "not valid" in error_text(events)


def test_expired_token_refused(tiny):
    old = token_for(tiny.secret, WHO, clock=lambda: time.time() - 120)
    final, events = infer_direct(tiny.backend.url, old)
    assert final == "error" and "expired" in error_text(events)


def test_run_route_that_skips_the_queue_is_closed(tiny):
    r = httpx.post(f"{tiny.backend.url}/gradio_api/run/infer", json={"data": ["x"]},
                   headers={"x-splitspace-identity": token_for(tiny.secret, WHO)})
    assert r.status_code >= 400
    assert "image_png_b64" not in r.text


def test_refused_calls_spend_no_model_time(tiny):
    before = httpx.get(f"{tiny.backend.url}/metrics").text
    infer_direct(tiny.backend.url, None)
    after = httpx.get(f"{tiny.backend.url}/metrics").text
    finished = lambda t: [l for l in t.splitlines() if l.startswith('splitspace_requests_total{outcome="finished"}')]
    assert finished(before) == finished(after)


def test_retired_secret_verifies_until_dropped(tmp_path):
    port = free_port()
    env = {"SPLITSPACE_MODEL": "sleep:1", "SPLITSPACE_STATE_PATH": str(tmp_path / "s.sqlite3")}
    tier = start_tier("backend", port, {**env, "SPLITSPACE_SECRET": "new-secret,old-secret"}, tmp_path / "a.log")
    try:
        old_token = token_for("old-secret", WHO)
        assert infer_direct(tier.url, old_token)[0] == "complete"
        assert infer_direct(tier.url, token_for("new-secret", WHO))[0] == "complete"
    finally:
        tier.stop()
    tier = start_tier("backend", port, {**env, "SPLITSPACE_SECRET": "new-secret"}, tmp_path / "b.log")
    try:
        final, events = infer_direct(tier.url, old_token)
        assert final == "error" and "not valid" in error_text(events)
    finally:
        tier.stop()
    assert "old-secret" not in tier.log() and "new-secret" not in tier.log()


def test_no_secret_configured_refuses_everything(tmp_path):
    env = {"SPLITSPACE_MODEL": "sleep:1", "SPLITSPACE_STATE_PATH": str(tmp_path / "s.sqlite3"), "SPLITSPACE_SECRET": ""}
    tier = start_tier("backend", free_port(), env, tmp_path / "c.log")
    try:
        final, events = infer_direct(tier.url, token_for("anything", WHO))
        assert final == "error" and "no SPLITSPACE_SECRET" in error_text(events)
    finally:
        tier.stop()


def test_secrets_never_logged(tiny):
    infer_direct(tiny.backend.url, token_for(tiny.secret, WHO))
    for log in (tiny.backend.log(), tiny.frontend.log()):
        assert tiny.secret not in log
        assert tiny.admin_token not in log
