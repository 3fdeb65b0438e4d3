"""`splitspace dev` with `tiny`: time to the first image, then latency through both tiers.

Starts `splitspace dev` as a user would, waits for the frontend, asks for one 512x512 image
with gradio_client (time from launch), then times 15 sequential REST calls and reports the
median, and the model's share of it from each result's `gpu_s`.

Run: python bench/startup.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, free_port, rest_call  # noqa: E402


async def latencies(url: str, n: int = 15) -> list[tuple[float, float]]:
    async with httpx.AsyncClient(timeout=60) as client:
        out = []
        for seed in range(n):
            t0 = time.perf_counter()
            ok, data = await rest_call(client, url, "generate", ["a cat", "", 512, 512, 2, 0.0, seed], {})
            if ok:
                out.append((time.perf_counter() - t0, data[1]["gpu_s"]))
        return out


def main() -> None:
    fport, bport = free_port(), free_port()
    state = Path(tempfile.mkdtemp(prefix="splitspace-startup-")) / "state.sqlite3"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitspace.deploy.cli",
            "dev",
            "--frontend-port",
            str(fport),
            "--backend-port",
            str(bport),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "SPLITSPACE_STATE_PATH": str(state)},
    )
    url = f"http://127.0.0.1:{fport}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        ready = time.perf_counter() - t0
        Client(url, verbose=False).predict("a cat", "", 512, 512, 2, 0.0, 1, api_name="/generate")
        first = time.perf_counter() - t0
        runs = asyncio.run(latencies(url))
        print(f"ready after {ready:.1f} s; first 512x512 tiny image {first:.1f} s after `splitspace dev` started")
        print(
            f"per request through both tiers (REST, 512x512, 2 steps): median "
            f"{statistics.median(t for t, _ in runs) * 1000:.0f} ms, of which the model "
            f"{statistics.median(g for _, g in runs) * 1000:.0f} ms"
        )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
