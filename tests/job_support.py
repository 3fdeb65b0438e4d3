"""What the jobs' and webhooks' tests share: API keys with webhook secrets, a webhook receiver, polling."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from tests.conftest import QUOTAS
from tests.support import TIER, keys_toml, tiers_toml

SECRET = "whsec_" + base64.b64encode(b"splitspace-webhook-test-secret-32b").decode()
JOB_KEYS = {
    "hooked": ("hooked-key-0101", "wide", SECRET),
    "plain": ("plain-key-0102", "wide", None),
    "narrow": ("narrow-key-0103", "tight", None),
}
JOB_QUOTAS = (
    QUOTAS
    + tiers_toml(wide={**TIER, "max_queued": 200, "gpu_seconds": 100000})
    + keys_toml(
        {name: tier for name, (_, tier, _) in JOB_KEYS.items()},
        lambda name: JOB_KEYS[name][0],
        {name: secret for name, (_, _, secret) in JOB_KEYS.items() if secret},
    )
)


def auth(name: str) -> dict[str, str]:
    from tests.conftest import KEYS

    raw = JOB_KEYS[name][0] if name in JOB_KEYS else KEYS[name][0]
    return {"Authorization": f"Bearer {raw}"}


def wait_job(
    url: str,
    job_id: str,
    headers: dict[str, str],
    states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    timeout_s: float = 60,
) -> dict[str, Any]:
    """Poll a job until its status is one of ``states``; the job."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if doc.get("status") in states or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


GENERATE = {"endpoint": "/generate", "inputs": {"prompt": "a red fox", "width": 64, "height": 64, "steps": 1}}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every request; ``fail[path]`` requests to a
    path are answered 500 first; a path in ``hang`` never answers (until the server stops)."""

    url: str = ""
    got: list[Received] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    cond: threading.Condition = field(default_factory=threading.Condition)
    stop: threading.Event = field(default_factory=threading.Event)

    def wait(self, count: int, path: str | None = None, timeout_s: float = 30) -> list[Received]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.at(path)) >= count, timeout_s)
            return self.at(path)

    def at(self, path: str | None) -> list[Received]:
        return [r for r in self.got if path is None or r.path == path]


@contextmanager
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with rec.cond:
                rec.got.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                rec.cond.notify_all()
                failing = rec.fail.get(self.path, 0)
                if failing:
                    rec.fail[self.path] = failing - 1
            if self.path in rec.hang:
                rec.stop.wait(30)
                return
            self.send_response(500 if failing else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.stop.set()
        server.shutdown()
        server.server_close()


def body_json(r: Received) -> dict[str, Any]:
    return json.loads(r.body)
