"""What the benchmarks share: starting the baseline and splitspace, REST calls, statistics.

Both systems run as real processes on loopback in the same run, so their
figures are comparable as ratios (absolute times on these machines are noisy).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from splitspace.deploy.processes import Deployment, TierProcess, free_port

REPO = Path(__file__).resolve().parent.parent

BASELINE = REPO / "bench" / "baseline"
"""The plain Gradio two-tier app measured beside splitspace (carried here, so a clone runs it)."""


def start_plain_gradio(
    args: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 90
) -> subprocess.Popen[bytes]:
    """``python ARGS`` (a plain Gradio app listening on ``port``), returned once it answers
    ``/gradio_api/info``; the run ends with the log's path if it never does."""
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"plain Gradio ({' '.join(args)}) did not start; see {log_path}")


def start_baseline(workdir: Path) -> tuple[TierProcess, TierProcess]:
    """The plain Gradio two-tier baseline (``bench/baseline``): one shared ``gradio_client``
    hop, FIFO queues, one "GPU" slot."""
    if not BASELINE.exists():
        raise SystemExit(f"baseline not found at {BASELINE}")
    procs = []
    bport, fport = free_port(), free_port()
    for script, args, port in (
        ("backend.py", [str(bport)], bport),
        ("frontend.py", [str(fport), f"http://127.0.0.1:{bport}/"], fport),
    ):
        log_path = workdir / f"baseline-{script}.log"
        proc = start_plain_gradio([str(BASELINE / script), *args], port, log_path, timeout_s=60)
        procs.append(TierProcess(script, f"http://127.0.0.1:{port}", proc, log_path))
    return procs[0], procs[1]


def sha256(key: str) -> str:
    """How a quota file names an API key: the sha256 of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def bench_quotas(keys: dict[str, tuple[str, str]], tiers: str) -> str:
    return tiers + "".join(
        f'\n[[keys]]\nname = "{name}"\ntier = "{tier}"\nsha256 = "{sha256(raw)}"\n'
        for name, (raw, tier) in keys.items()
    )


async def rest_call(
    client: httpx.AsyncClient, url: str, api: str, data: list[Any], headers: dict[str, str], timeout_s: float = 120.0
) -> tuple[bool, Any]:
    """POST /gradio_api/call/<api> then read the stream; (ok, final data or error text).

    A call with no final event within ``timeout_s`` counts as failed ("timeout")."""
    try:
        return await asyncio.wait_for(_rest_call(client, url, api, data, headers), timeout_s)
    except TimeoutError:
        return False, "timeout"


async def _rest_call(
    client: httpx.AsyncClient, url: str, api: str, data: list[Any], headers: dict[str, str]
) -> tuple[bool, Any]:
    r = await client.post(f"{url}/gradio_api/call/{api}", json={"data": data}, headers=headers)
    if r.status_code != 200:
        return False, f"HTTP {r.status_code}"
    event_id = r.json()["event_id"]
    event = ""
    async with client.stream("GET", f"{url}/gradio_api/call/{api}/{event_id}", headers=headers) as s:
        async for line in s.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line[5:].strip())
                return event == "complete" and payload not in (None, [None]), payload
    return False, "stream ended"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


__all__ = [
    "Deployment",
    "TierProcess",
    "bench_quotas",
    "free_port",
    "median",
    "pct",
    "rest_call",
    "sha256",
    "start_baseline",
]
