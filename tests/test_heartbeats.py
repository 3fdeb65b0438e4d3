"""Idle pages cost bounded memory that is given back (issue 21, item 6), through the real tiers.

Every open page holds a ``GET /gradio_api/heartbeat/<session>`` stream, for free: 2,000
of them cost the frontend 88 MB that it kept after they closed. Now each address may
hold ``SPLITSPACE_HEARTBEATS_PER_ADDRESS`` and all together ``SPLITSPACE_HEARTBEATS_TOTAL``;
beyond, ``429 Too many open pages``. When the pages close, ``/health`` counts none open
and no session state kept, and the places are free again.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.support import Deployment, wait_for


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    caps = {"SPLITSPACE_HEARTBEATS_PER_ADDRESS": "2", "SPLITSPACE_HEARTBEATS_TOTAL": "3"}
    d = Deployment(tmp_path_factory.mktemp("heartbeats"), model="sleep:1", frontend_env=caps)
    d.start()
    yield d
    d.stop()


class Page:
    """One open page's heartbeat stream, from ``address`` (behind the trusted proxy)."""

    def __init__(self, url: str, address: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.sendall(
            f"GET /gradio_api/heartbeat/{secrets.token_hex(8)} HTTP/1.1\r\nHost: t\r\n"
            f"X-Forwarded-For: {address}\r\n\r\n".encode()
        )
        reply = b""
        while b"ALIVE" not in reply and not (b"\r\n\r\n" in reply and reply.endswith(b"}")):
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        head, _, self.body = reply.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ")[1])
        self.headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.decode().partition(":") for line in head.split(b"\r\n")[1:])
        }

    def close(self) -> None:
        self.sock.close()


def pages(url: str) -> dict[str, int]:
    return httpx.get(f"{url}/health", timeout=10).json()["pages"]


def test_open_pages_are_capped_per_address_and_in_all_and_given_back(capped: Deployment):
    assert capped.frontend is not None
    url = capped.frontend.url
    opened = [Page(url, "10.1.0.1"), Page(url, "10.1.0.1")]
    try:
        assert [p.status for p in opened] == [200, 200]
        third = Page(url, "10.1.0.1")
        assert third.status == 429 and third.headers["retry-after"] == "30"
        doc = json.loads(third.body)
        assert doc["title"] == "Too many open pages" and "from this address (at most 2)" in doc["message"]
        opened.append(Page(url, "10.1.0.2"))  # another address: the last place in all
        assert opened[-1].status == 200
        elsewhere = Page(url, "10.1.0.3")
        assert elsewhere.status == 429 and "on this server (at most 3)" in json.loads(elsewhere.body)["message"]
        assert pages(url)["open"] == 3
    finally:
        for page in opened:
            page.close()
    # closed: nothing open, and no session state kept (Gradio's unload ran and its state went)
    assert wait_for(lambda: pages(url) == {"open": 0, "sessions": 0}, 30), pages(url)
    again = Page(url, "10.1.0.1")
    assert again.status == 200
    again.close()
