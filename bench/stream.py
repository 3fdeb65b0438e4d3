"""Streaming benchmark: a generator through splitspace's two tiers vs the same generator in one
plain Gradio tier (``bench/stream_app.py``, both in the same run, on this machine).

Measured, each chunk's arrival against the time the generator made it (same clock):
- one caller, a generator of ``--chunks`` (200) chunks ``--every-ms`` (10) ms apart, over the
  REST event stream: latency per chunk at p50 and p99 on each system, what splitspace adds
  (goals: 5 ms and 20 ms), and chunks lost, duplicated or out of order (goal: none);
- ``--crowd`` (100) concurrent streams from as many clients (distinct API keys), each
  ``--crowd-chunks`` chunks: all complete and whole, and the frontend's memory per open stream;
- an abandoned stream: a caller leaves mid-stream while another waits; the time from its
  leaving until the GPU is busy with the waiting job (its first chunk made; goal < 0.5 s), for
  chunks 10 ms apart (sync generator) and 500 ms apart (async generator).

Run: python bench/stream.py [--chunks 200] [--every-ms 10] [--rounds 3] [--crowd 100]
     [--crowd-chunks 20] [--leaves 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Deployment, bench_quotas, free_port, median, pct, start_plain_gradio  # noqa: E402

APP = REPO / "bench" / "stream_app.py"
Events = list[tuple[float, str, Any]]


def rss_mb(pid: int) -> float:
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024


def start_plain(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The generator in one plain Gradio tier."""
    port = free_port()
    return start_plain_gradio([str(APP), str(port)], port, workdir / "plain.log"), f"http://127.0.0.1:{port}"


async def stream(
    c: httpx.AsyncClient,
    url: str,
    api: str,
    data: list[Any],
    headers: dict[str, str],
    leave: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
) -> Events:
    """One call over the REST event stream: (arrival, event, data) per event. With ``leave``,
    the caller goes away at the first chunk after it is set; ``started`` is set at the first chunk."""
    r = await c.post(f"{url}/gradio_api/call/{api}", json={"data": data}, headers=headers)
    r.raise_for_status()
    event_id, name, events = r.json()["event_id"], "", []
    async with c.stream("GET", f"{url}/gradio_api/call/{api}/{event_id}", headers=headers) as s:
        async for line in s.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events.append((time.time(), name, json.loads(line[5:].strip())))
                if name in ("complete", "error"):
                    break
                if started is not None:
                    started.set()
                if leave is not None and leave.is_set():
                    break
    return events


def chunks_of(events: Events) -> list[tuple[float, int, float]]:
    """(arrival, index, made) of each streamed chunk."""
    out = []
    for arrived, name, data in events:
        if name == "generating" and isinstance(data, list) and isinstance(data[0], str):
            index, made = data[0].split()
            out.append((arrived, int(index), float(made)))
    return out


def integrity(events: Events, n: int) -> tuple[int, int, int, bool]:
    """(lost, duplicated, out of order, completed) of one stream of ``n`` chunks."""
    indices = [i for _, i, _ in chunks_of(events)]
    complete = bool(events) and events[-1][1] == "complete"
    final = events[-1][2][0].split()[0] if complete else None
    if final is not None and (not indices or int(final) != indices[-1]):
        indices.append(int(final))  # a last chunk that came only as the result
    lost = n - len(set(indices))
    dup = len(indices) - len(set(indices))
    disorder = sum(1 for a, b in zip(indices, indices[1:], strict=False) if b < a)
    return lost, dup, disorder, complete


async def one_caller(url: str, n: int, every_ms: float, headers: dict[str, str]) -> tuple[list[float], tuple]:
    async with httpx.AsyncClient(timeout=300) as c:
        await stream(c, url, "chunks", [3, 1], headers)  # warm up
        events = await stream(c, url, "chunks", [n, every_ms], headers)
    lags = [(arrived - made) * 1000 for arrived, _, made in chunks_of(events)]
    return lags, integrity(events, n)


async def crowd(url: str, clients: int, n: int, every_ms: float, key_of: Any, pid: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients * 2 + 10, max_keepalive_connections=clients * 2 + 10)
    rss0 = rss_mb(pid)
    peak = [rss0]
    async with httpx.AsyncClient(timeout=900, limits=limits) as c:
        tasks = [asyncio.create_task(stream(c, url, "chunks", [n, every_ms], key_of(i))) for i in range(clients)]

        async def watch() -> None:
            while not all(t.done() for t in tasks):
                peak[0] = max(peak[0], rss_mb(pid))
                await asyncio.sleep(0.2)

        t0 = time.perf_counter()
        await asyncio.gather(watch(), *tasks, return_exceptions=True)
        elapsed = time.perf_counter() - t0
    results = [t.result() if not t.exception() else [] for t in tasks]
    whole = sum(1 for ev in results if integrity(ev, n) == (0, 0, 0, True))
    return {
        "whole": whole,
        "elapsed_s": elapsed,
        "rss0": rss0,
        "peak": peak[0],
        "per_stream_kb": (peak[0] - rss0) * 1024 / clients,
    }


async def abandon(url: str, api: str, every_ms: float, leaver: dict[str, str], waiter: dict[str, str]) -> float:
    """A caller leaves its endless stream while another waits: seconds from leaving until the
    waiting job's first chunk is made."""
    async with httpx.AsyncClient(timeout=300) as c:
        leave, started = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(stream(c, url, api, [10**6, every_ms], leaver, leave, started))
        await started.wait()
        second = asyncio.create_task(stream(c, url, api, [1, 1], waiter))
        await asyncio.sleep(1.0 + every_ms / 1000)  # the second has joined the queue, behind the first
        leave.set()
        await first
        left = time.time()
        events = await second
    made = chunks_of(events)[0][2] if chunks_of(events) else float(events[-1][2][0].split()[1])
    return made - left


def quotas(clients: int) -> str:
    keys = {f"c{i}": (f"key-c{i}", "bulk") for i in range(clients)}
    keys.update({"one": ("key-one", "bulk"), "leaver": ("key-leaver", "bulk"), "waiter": ("key-waiter", "bulk")})
    return bench_quotas(
        keys,
        "\n[tiers.bulk]\nweight = 1\nmax_running = 1\nmax_queued = 1000\n"
        "gpu_seconds = 1e9\nwindow_s = 3600\n"
        "\n[tiers.anonymous]\nmax_queued = 1000\ngpu_seconds = 1e9\naddress_gpu_seconds = 1e9\n"
        "requests_per_minute = 1000000\n",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--every-ms", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3, help="one-caller rounds, systems interleaved")
    ap.add_argument("--crowd", type=int, default=100)
    ap.add_argument("--crowd-chunks", type=int, default=20)
    ap.add_argument("--leaves", type=int, default=5, help="abandoned streams per case")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="splitspace-stream-"))
    env = {"SPLITSPACE_APP": str(APP)}
    d = Deployment(
        work / "splitspace", quotas=quotas(args.crowd), backend_env=dict(env), frontend_env=dict(env)
    ).start()
    plain, plain_url = start_plain(work)
    assert d.frontend is not None
    systems = {
        "plain Gradio (one tier)": (plain_url, plain.pid),
        "splitspace (two tiers)": (d.frontend.url, d.frontend.proc.pid),
    }
    bearer = {"plain Gradio (one tier)": {}, "splitspace (two tiers)": {"authorization": "Bearer key-one"}}
    try:
        lags: dict[str, list[float]] = {name: [] for name in systems}
        faults: dict[str, list[int]] = {name: [0, 0, 0, 0] for name in systems}
        for _ in range(args.rounds):
            for name, (url, _) in systems.items():
                got, (lost, dup, disorder, complete) = asyncio.run(
                    one_caller(url, args.chunks, args.every_ms, bearer[name])
                )
                lags[name] += got
                for k, v in enumerate((lost, dup, disorder, not complete)):
                    faults[name][k] += int(v)
        print(
            f"\n== one caller: {args.chunks} chunks {args.every_ms:g} ms apart, REST event stream, "
            f"{args.rounds} rounds (latency = arrival - made) =="
        )
        print(
            f"{'system':<26}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'lost':>6}{'dup':>5}{'order':>6}{'unfinished':>11}"
        )
        for name in systems:
            x = lags[name]
            f = faults[name]
            print(f"{name:<26}{median(x):>8.2f}{pct(x, 99):>8.2f}{max(x):>8.2f}{f[0]:>6}{f[1]:>5}{f[2]:>6}{f[3]:>11}")
        base, ours = lags["plain Gradio (one tier)"], lags["splitspace (two tiers)"]
        print(
            f"added by the second tier: p50 {median(ours) - median(base):+.2f} ms (goal 5), "
            f"p99 {pct(ours, 99) - pct(base, 99):+.2f} ms (goal 20)"
        )

        print(
            f"\n== {args.crowd} concurrent streams from {args.crowd} clients, {args.crowd_chunks} chunks "
            f"{args.every_ms:g} ms apart each (one GPU: they run in turn) =="
        )
        for name, (url, pid) in systems.items():
            key_of = (lambda i: {}) if name.startswith("plain") else (lambda i: {"authorization": f"Bearer key-c{i}"})
            r = asyncio.run(crowd(url, args.crowd, args.crowd_chunks, args.every_ms, key_of, pid))
            print(
                f"{name:<26} whole {r['whole']}/{args.crowd} in {r['elapsed_s']:.1f} s; memory of the tier "
                f"callers reach {r['rss0']:.0f} -> {r['peak']:.0f} MB ({r['per_stream_kb']:.0f} KB per open stream)"
            )

        print(
            f"\n== an abandoned stream: from the caller leaving to the GPU busy with the next job "
            f"({args.leaves} each; goal < 500 ms) =="
        )
        for api, every_ms in (("chunks", args.every_ms), ("achunks", 500.0)):
            for name, (url, _) in systems.items():
                heads = (
                    ({}, {})
                    if name.startswith("plain")
                    else ({"authorization": "Bearer key-leaver"}, {"authorization": "Bearer key-waiter"})
                )
                waits = [asyncio.run(abandon(url, api, every_ms, *heads)) * 1000 for _ in range(args.leaves)]
                print(f"{name:<26} {api} {every_ms:g} ms apart: median {median(waits):.0f} ms, max {max(waits):.0f} ms")
    finally:
        d.stop()
        plain.terminate()
        plain.wait(10)


if __name__ == "__main__":
    main()
