"""The UI in a real browser: headless Chromium driven by Playwright, against the real tiers.

Chromium is the system's (Debian's ``chromium``, or ``SPLITSPACE_CHROMIUM``); Playwright's
own browser download is never used. The deployment runs ``sleep:1500`` so that a job
holds the GPU long enough to watch another one wait. Two small local servers play other
sites that embed the frontend (an iframe, the ``<gradio-app>`` web component); one of them
is in the frontend's ``SPLITSPACE_CORS_ORIGINS``.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from cpu_frontend.embed import web_component_script
from tests.clients import call_rest, gen_args
from tests.conftest import QUOTAS, key
from tests.support import Deployment

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
GENERATED_IMG = 'img[src*="/gradio_api/file="]'
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SPLITSPACE_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


pytestmark = pytest.mark.skipif(
    chromium_path() is None, reason="no chromium on PATH (apt-get install chromium, or set SPLITSPACE_CHROMIUM)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


class _Site(BaseHTTPRequestHandler):
    pages: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        body = self.pages.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


def serve_site(frontend_url: str) -> ThreadingHTTPServer:
    """Another site's pages that embed the frontend: ``/iframe`` and ``/webcomponent``.

    Served on 127.0.0.1 but visited as ``http://localhost:PORT``: ``localhost`` is not the
    same site as ``127.0.0.1``, and both are loopback (Chromium refuses a public page
    that reaches into the local network).
    """
    pages = {
        "/iframe": f'<!doctype html><html><body><h1>another site</h1><iframe id="splitspace" '
                   f'src="{frontend_url}/" width="1200" height="950"></iframe></body></html>',
        "/webcomponent": f'<!doctype html><html><head><script type="module" '
                         f'src="{frontend_url}/{web_component_script()}"></script></head><body>'
                         f'<h1>another site</h1><gradio-app src="{frontend_url}" eager="true"></gradio-app>'
                         f'</body></html>',
    }
    handler = type("Site", (_Site,), {"pages": {k: v.encode() for k, v in pages.items()}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class UI:
    dep: Deployment
    allowed_site: str
    """Another site listed in SPLITSPACE_CORS_ORIGINS."""
    other_site: str
    """Another site, not listed."""

    @property
    def url(self) -> str:
        return self.dep.frontend.url


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    d = Deployment(tmp_path_factory.mktemp("browser"), model="sleep:1500", quotas=QUOTAS)
    frontend_url = f"http://127.0.0.1:{d.frontend_port}"
    allowed, other = serve_site(frontend_url), serve_site(frontend_url)
    allowed_site = f"http://localhost:{allowed.server_port}"
    d.frontend_env["SPLITSPACE_CORS_ORIGINS"] = allowed_site
    try:
        d.start()
        yield UI(d, allowed_site, f"http://localhost:{other.server_port}")
    finally:
        d.stop()
        for server in (allowed, other):
            server.shutdown()
            server.server_close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


def session_cookie(ctx: Any) -> dict[str, Any]:
    cookies = [c for c in ctx.cookies() if c["name"] == "splitspace_session"]
    assert len(cookies) == 1, ctx.cookies()
    return cookies[0]


def session_client_id(cookie: dict[str, Any]) -> str:
    """The client id the GPU tier reports for requests carrying this cookie (the signed id's payload)."""
    return "session:" + cookie["value"].rsplit(".", 1)[0]


def generate_in(scope: Any, prompt: str) -> None:
    """Type a prompt and click Generate in a page or a frame."""
    scope.get_by_label("Prompt").fill(prompt)
    scope.get_by_role("button", name="Generate").click()


def test_page_loads_sets_httponly_cookie_and_generates(ui: UI, context: Any) -> None:
    page = context.new_page()
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(ui.url + "/")
    page.get_by_role("button", name="Generate").wait_for()

    cookie = session_cookie(context)
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax" and cookie["secure"] is False  # plain HTTP
    assert "splitspace_session" not in page.evaluate("document.cookie")  # HttpOnly: not readable by JS

    generate_in(page, "a red fox")
    page.locator(GENERATED_IMG).first.wait_for()
    # The request carried the cookie: the GPU tier saw this browser session, not the address.
    page.get_by_text(session_client_id(cookie)).first.wait_for()
    assert not failed, failed


def _occupy_gpu(url: str, n: int) -> list[threading.Thread]:
    """n generate calls from another client (the `alpha` API key), in the background."""

    def one() -> None:
        with httpx.Client(timeout=60) as c:
            call_rest(c, url, "generate", gen_args(), {"Authorization": f"Bearer {key('alpha')}"})

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _wait_until_running(url: str, api_key: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10) as c:
        while time.monotonic() < deadline:
            final, events = call_rest(c, url, "quota", [], {"Authorization": f"Bearer {api_key}"})
            if final == "complete" and events[-1][1][0]["running"] >= 1:
                return
            time.sleep(0.05)
    raise AssertionError("the occupying requests never started on the GPU")


def test_queue_position_shows_while_waiting(ui: UI, context: Any) -> None:
    page = context.new_page()
    page.goto(ui.url + "/")
    page.get_by_label("Prompt").fill("a patient fox")

    threads = _occupy_gpu(ui.url, 2)
    _wait_until_running(ui.url, key("alpha"))
    page.get_by_role("button", name="Generate").click()

    # The UI renders the handler's progress text: "position N, about S s".
    position = page.get_by_text(re.compile(r"position \d+, about \d+ s"))
    position.first.wait_for(timeout=10_000)
    page.locator(GENERATED_IMG).first.wait_for()
    position.first.wait_for(state="hidden")  # gone once the image is there
    for t in threads:
        t.join(timeout=30)


def test_webcomponent_page_generates(ui: UI, context: Any) -> None:
    page = context.new_page()
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    response = page.goto(ui.url + "/embed/webcomponent")
    assert response.status == 200, "the frontend serves no /embed/webcomponent (cpu_frontend.embed.embed_routes)"

    app = page.locator("gradio-app")
    assert app.get_attribute("src") == ui.url
    generate_in(page, "a fox in a web component")
    page.locator(GENERATED_IMG).first.wait_for()
    page.get_by_text(session_client_id(session_cookie(context))).first.wait_for()
    assert not failed, failed  # the component's script and stylesheet come from the frontend


def test_iframe_page_generates_with_session_cookie(ui: UI, context: Any) -> None:
    page = context.new_page()
    response = page.goto(ui.url + "/embed/iframe")
    assert response.status == 200, "the frontend serves no /embed/iframe (cpu_frontend.embed.embed_routes)"
    frame = page.frame_locator("iframe#splitspace")
    generate_in(frame, "a fox in a frame")
    frame.locator(GENERATED_IMG).first.wait_for()

    cookie = session_cookie(context)
    assert cookie["httpOnly"] is True
    # The frame's own requests carried the cookie: the job ran as this browser session.
    frame.get_by_text(session_client_id(cookie)).first.wait_for()


def test_cross_site_iframe_behind_https_proxy_keeps_session(ui: UI, browser: Any) -> None:
    """As on Hugging Face: the app framed by another site, behind a TLS proxy.

    ``X-Forwarded-Proto: https`` (trusted: the deployment has one trusted proxy) makes the
    cookie ``Secure; SameSite=None; Partitioned``, which Chromium keeps in a third-party
    frame (partitioned by the top-level site) and sends with the frame's requests.
    """
    ctx = browser.new_context(extra_http_headers={"X-Forwarded-Proto": "https"})
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        page = ctx.new_page()
        page.goto(ui.other_site + "/iframe")
        frame = page.frame_locator("iframe#splitspace")
        generate_in(frame, "a fox on another site")
        frame.locator(GENERATED_IMG).first.wait_for()
        cookie = session_cookie(ctx)
        assert cookie["secure"] is True and cookie["sameSite"] == "None" and cookie["httpOnly"] is True
        assert cookie.get("partitionKey", "").startswith("http://localhost")
        frame.get_by_text(session_client_id(cookie)).first.wait_for()
    finally:
        ctx.close()


def test_cross_site_iframe_on_plain_http_falls_back_to_address(ui: UI, browser: Any) -> None:
    """Plain HTTP: the ``SameSite=Lax`` cookie is refused in a third-party frame; the caller is its address."""
    ctx = browser.new_context()
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        page = ctx.new_page()
        page.goto(ui.other_site + "/iframe")
        frame = page.frame_locator("iframe#splitspace")
        generate_in(frame, "a fox without a cookie")
        frame.locator(GENERATED_IMG).first.wait_for()
        assert not [c for c in ctx.cookies() if c["name"] == "splitspace_session"]
        frame.get_by_text("addr:127.0.0.1").first.wait_for()
    finally:
        ctx.close()


def test_webcomponent_on_a_site_in_cors_origins_generates(ui: UI, context: Any) -> None:
    """<gradio-app> on another site talks to the frontend cross-origin: it needs that site in
    SPLITSPACE_CORS_ORIGINS (its requests carry no cookie, so the caller is its address)."""
    page = context.new_page()
    page.goto(ui.allowed_site + "/webcomponent")
    generate_in(page, "a fox on a friendly site")
    page.locator(GENERATED_IMG).first.wait_for()
    page.get_by_text("addr:127.0.0.1").first.wait_for()


def test_webcomponent_on_a_site_not_in_cors_origins_is_refused(ui: UI, context: Any) -> None:
    page = context.new_page()
    blocked: list[str] = []
    page.on("requestfailed", lambda r: blocked.append(r.url))
    page.goto(ui.other_site + "/webcomponent")  # waits for the load event: the module script has failed
    assert page.evaluate("customElements.get('gradio-app') === undefined")
    assert any("/assets/" in u for u in blocked), blocked
