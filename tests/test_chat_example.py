"""``examples/chat.py`` through both tiers: a ``gr.ChatInterface`` whose model streams
tokens (``TextIteratorStreamer``) answers token by token, to gradio_client and in a browser.

The model is the example's default, a tiny GPT-2 with random weights made in code (no
download), loaded on the GPU tier at its first call; the frontend never imports torch.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from gradio_client import Client

from tests.support import GPU_TIER_BACKLOG, Deployment

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    env = {"SPLITSPACE_APP": "examples/chat.py"}
    d = Deployment(
        tmp_path_factory.mktemp("chat"), backend_env=dict(env), frontend_env={**env, **GPU_TIER_BACKLOG}
    ).start()
    yield d
    d.stop()


def grows(answers: list[str]) -> bool:
    """Each answer extends the one before (a stream of one reply, token by token)."""
    return all(b.startswith(a) and len(b) > len(a) for a, b in zip(answers, answers[1:], strict=False))


def test_the_chat_api_answers_token_by_token(chat: Deployment) -> None:
    assert chat.frontend is not None
    client = Client(chat.frontend.url, verbose=False)
    try:
        job = client.submit("the quick fox", api_name="/chat")
        answers = [answer for answer in job]
        assert job.result(timeout=120) == answers[-1]
    finally:
        client.close()
    assert len(answers) >= 3 and grows(answers), answers
    assert "torch" not in httpx.get(f"{chat.frontend.url}/health", timeout=10).text  # (the page is up)


def test_the_chat_page_answers_token_by_token_in_a_browser(chat: Deployment) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH")
    assert chat.frontend is not None
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(chat.frontend.url)
            page.wait_for_selector("textarea")
            # every text the last answer bubble shows, as the page changes
            page.evaluate("""() => {
                window.seen = [];
                new MutationObserver(() => {
                    const bots = document.querySelectorAll('[data-testid="bot"]');
                    if (!bots.length) return;
                    const text = bots[bots.length - 1].innerText.trim();
                    if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""")
            box = page.locator("textarea").first
            box.fill("a river runs")
            box.press("Enter")
            page.wait_for_function("() => window.seen.length > 0")
            page.wait_for_function(
                "() => !document.querySelector('textarea').disabled && "
                "document.querySelectorAll('.generating').length === 0"
            )
            seen: list[Any] = page.evaluate("() => window.seen")
        finally:
            browser.close()
    assert len(seen) >= 3 and grows(seen), seen
