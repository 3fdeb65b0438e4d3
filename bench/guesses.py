"""Guessing the admin token against a real GPU tier (issue 21, 2 and 7).

The second release let 300 wrong dashboard passwords (Gradio's ``/login``) and 300 wrong
admin-API tokens through in about a second each, never slower. This starts a GPU tier on
loopback, sends N wrong guesses of each from one address (127.0.0.20, then 127.0.0.21),
counts the answers and times them, and then sends the right token from a third address.

    python bench/guesses.py [--n 300]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import httpx

from splitspace.deploy.processes import Deployment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    n = parser.parse_args().n
    d = Deployment(Path(tempfile.mkdtemp()), model="sleep:1")
    d.workdir.mkdir(parents=True, exist_ok=True)
    d.start_backend()
    assert d.backend is not None

    def at(address: str) -> httpx.Client:
        return httpx.Client(
            base_url=d.backend.url,
            timeout=10,  # type: ignore[union-attr]
            transport=httpx.HTTPTransport(local_address=address),
        )

    try:
        with at("127.0.0.20") as c:
            t = time.monotonic()
            codes = collections.Counter(
                c.post("/admin/ui/login", data={"username": "admin", "password": f"wrong-{i}-abcdefghijk"}).status_code
                for i in range(n)
            )
            print(f"{n} wrong dashboard passwords: {dict(codes)} in {time.monotonic() - t:.2f} s")
        with at("127.0.0.21") as c:
            t = time.monotonic()
            codes = collections.Counter(
                c.get("/admin/clients", headers={"X-Splitspace-Admin": f"wrong-{i}-abcdefghijk"}).status_code
                for i in range(n)
            )
            print(f"{n} wrong admin tokens: {dict(codes)} in {time.monotonic() - t:.2f} s")
        with at("127.0.0.22") as c:
            right = c.get("/admin/clients", headers={"X-Splitspace-Admin": d.admin_token}).status_code
            print(f"the right token from another address: {right}")
    finally:
        d.stop()


if __name__ == "__main__":
    main()
