"""What an outsider can reach without a request: sockets held open, the public health page,
and a weak admin token.

First release: a slow client kept its socket forever (no header deadline); the frontend's
public ``/health`` showed the GPU tiers' URLs; a whitespace-only ``SPLITSPACE_ADMIN_TOKEN``
enabled the admin API with a token nobody could send.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import ValidationError

from splitspace.shared.config.settings import Settings
from tests.support import REPO, Deployment, free_port

HEADER_DEADLINE_S = 10.0
KEEP_ALIVE_S = 20.0  # shared/http/server.py: longer than clients keep an idle connection (httpx 5 s, aiohttp 15 s)


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (sending ``trickle`` every second), or None."""
    started = time.monotonic()
    sock.settimeout(1.0)
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - started
        if trickle:
            try:
                sock.sendall(trickle)
            except OSError:
                return time.monotonic() - started
    return None


@pytest.mark.parametrize("tier", ["frontend", "backend"])
def test_slow_headers_lose_their_socket(direct: Deployment, tier: str) -> None:
    port = int((direct.frontend if tier == "frontend" else direct.backend).url.rsplit(":", 1)[1])  # type: ignore[union-attr]
    with socket.create_connection(("127.0.0.1", port)) as slowloris:
        slowloris.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        took = _closed_within(slowloris, HEADER_DEADLINE_S + 10, trickle=b"X-A: b\r\n")
    assert took is not None and took >= HEADER_DEADLINE_S - 1, took
    with socket.create_connection(("127.0.0.1", port)) as silent:
        took = _closed_within(silent, HEADER_DEADLINE_S + 10)
    assert took is not None, "a connection that sent nothing stayed open"


@pytest.mark.parametrize("tier", ["frontend", "backend"])
def test_headers_over_64_kib_are_refused(direct: Deployment, tier: str) -> None:
    """First release: httptools buffered headers of any size (10 MB were accepted)."""
    base = (direct.frontend if tier == "frontend" else direct.backend).url  # type: ignore[union-attr]
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 431"), head[:200]
    assert httpx.get(f"{base}/health", headers={"x-fine": "a" * 8000}).status_code == 200


def test_an_idle_keep_alive_connection_is_closed(direct: Deployment) -> None:
    port = int(direct.frontend.url.rsplit(":", 1)[1])  # type: ignore[union-attr]
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        took = _closed_within(s, KEEP_ALIVE_S + 10)
    assert took is not None and took < KEEP_ALIVE_S + 5, took


def test_public_health_shows_no_internal_urls(direct: Deployment) -> None:
    doc = httpx.get(f"{direct.frontend.url}/health").json()  # type: ignore[union-attr]
    assert doc["status"] == "ok"
    assert [b["healthy"] for b in doc["backends"]] == [True]
    assert "boot_id" in doc and "backend_boot_ids" in doc  # what the dev page's reload script reads
    text = str(doc)
    assert direct.backend_urls() not in text and f":{direct.backend_port}" not in text, doc


@pytest.mark.parametrize("token", ["   ", "short-token", " \t"])
def test_a_blank_or_short_admin_token_is_refused_at_startup(token: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(admin_token=token)
    message = str(caught.value)
    assert "SPLITSPACE_ADMIN_TOKEN" in message and ("blank" in message or "at least 16" in message)
    if token.strip():
        assert token not in message  # a secret never in an error


def test_an_empty_admin_token_leaves_the_admin_api_off_and_a_good_one_is_kept() -> None:
    assert Settings(admin_token="").admin_token is None
    good = "k3y-0f-16-chars!"  # 16 characters, 12 of them different
    assert Settings(admin_token=f" {good}\n").admin_token.get_secret_value() == good  # type: ignore[union-attr]


@pytest.mark.parametrize("token", ["a" * 16, "passwordpassword", "12341234123412341234"])
def test_a_long_but_simple_admin_token_is_refused_at_startup(token: str) -> None:
    """Issue 21: any 16 characters were accepted, "aaaaaaaaaaaaaaaa" too."""
    with pytest.raises(ValidationError) as caught:
        Settings(admin_token=token)
    message = str(caught.value)
    assert "SPLITSPACE_ADMIN_TOKEN is too simple" in message and "token_urlsafe" in message
    assert token not in message


def test_the_gpu_tier_does_not_start_with_a_weak_admin_token(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "SPLITSPACE_ADMIN_TOKEN": "hunter2",
        "SPLITSPACE_SECRET": "s" * 32,
        "SPLITSPACE_MODEL": "sleep:1",
        "SPLITSPACE_STATE_PATH": str(tmp_path / "s.sqlite3"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "splitspace.deploy.cli", "backend", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "SPLITSPACE_ADMIN_TOKEN is too short" in done.stderr and "hunter2" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
