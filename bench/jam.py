"""The jam: addresses that POST their cap and never read, beside one well-behaved client.

An attack on the frontend's door that costs the attacker nothing. ``--attackers`` addresses (127.0.0.10 onward), each
every ``--period`` seconds, POST as many ``/call`` requests as their cap allows
(anonymous: ``max_running + max_queued`` = 5) and never open the event streams. One
well-behaved client (an API key with the anonymous tier's limits) runs one 100 ms job after another, reading each
answer. Printed: the well-behaved client's job times (p50, worst), and how often the
GPU sat idle while work waited (samples every 0.5 s: the GPU tier had nothing queued or
running while requests waited in line at the frontend's door; also shown, while a
request was inside the door, which includes the hop of one request on its way). Goals:
worst under 3 s, idle while work waits under 5%.

The same attack on plain Gradio (``bench/baseline``, FIFO, one "GPU" slot) runs in the
same run unless ``--skip-baseline``: it runs every unread call, so the well-behaved
client waits behind all of them.

    python bench/jam.py [--attackers 40] [--seconds 93] [--period 31] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import Deployment, bench_quotas, median, rest_call, start_baseline

CAP = 5  # the anonymous tier's max_running + max_queued
BEHAVED = "jam-behaved-key"
BEHAVED_TIER = "[tiers.behaved]\nweight = 1\nmax_running = 1\nmax_queued = 4\ngpu_seconds = 100000\n"
"""The well-behaved client's API key and tier: the anonymous tier's weight and caps, without
its 60 calls a minute (it calls back to back)."""


@dataclass
class Run:
    jobs: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    idle_at: list[tuple[float, dict[str, int], dict[str, Any]]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    failed: int = 0
    posted: int = 0
    refused: int = 0
    samples: int = 0
    idle_while_waiting: int = 0
    idle_while_inside: int = 0
    door_full: int = 0


async def attack(url: str, api: str, data: list[Any], address: str, period: float, until: float, run: Run) -> None:
    async with httpx.AsyncClient(timeout=30, transport=httpx.AsyncHTTPTransport(local_address=address)) as c:
        while time.monotonic() < until:
            answers = await asyncio.gather(
                *(c.post(f"{url}/gradio_api/call/{api}", json={"data": data}) for _ in range(CAP)),
                return_exceptions=True,
            )
            for a in answers:
                run.posted += 1
                if not isinstance(a, httpx.Response) or a.status_code != 200:
                    run.refused += 1
            await asyncio.sleep(max(0.0, min(period, until - time.monotonic())))


async def behave(url: str, api: str, data: list[Any], headers: dict[str, str], until: float, run: Run) -> None:
    async with httpx.AsyncClient(timeout=60, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")) as c:
        while time.monotonic() < until:
            t0 = time.monotonic()
            ok, _ = await rest_call(c, url, api, data, headers, timeout_s=60)
            if ok:
                run.jobs.append(time.monotonic() - t0)
                run.started.append(t0 - run.t0)
            else:
                run.failed += 1
            await asyncio.sleep(0.2)


async def sample(frontend: str, backend: str, until: float, run: Run) -> None:
    async with httpx.AsyncClient(timeout=5) as c:
        while time.monotonic() < until:
            fe, be = await asyncio.gather(c.get(f"{frontend}/health"), c.get(f"{backend}/health"))
            door, gpu = fe.json()["door"], be.json()
            run.samples += 1
            if gpu["queued"] + gpu["running"] == 0:
                run.idle_while_waiting += door["waiting"] > 0
                run.idle_while_inside += door["inside"] > 0
                if door["waiting"] + door["inside"] > 0:
                    run.idle_at.append((time.monotonic() - run.t0, door, {k: gpu[k] for k in ("queued", "running")}))
            run.door_full += door["inside"] >= 64
            await asyncio.sleep(0.5)


async def one_run(
    url: str,
    api: str,
    data: list[Any],
    headers: dict[str, str],
    attackers: int,
    seconds: float,
    period: float,
    health: tuple[str, str] | None,
) -> Run:
    run = Run()
    run.t0 = time.monotonic()
    until = time.monotonic() + seconds
    tasks = [attack(url, api, data, f"127.0.0.{10 + i}", period, until, run) for i in range(attackers)]
    tasks.append(behave(url, api, data, headers, until, run))
    if health is not None:
        tasks.append(sample(*health, until, run))
    await asyncio.gather(*tasks)
    return run


def report(name: str, run: Run, job_s: float, where: bool) -> None:
    worst = max(run.jobs, default=float("nan"))
    line = (
        f"{name:>11}: well-behaved jobs {len(run.jobs)} (failed {run.failed}), p50 {median(run.jobs):.2f} s, "
        f"worst {worst:.2f} s ({worst / job_s:.0f} job times); attackers posted {run.posted}, "
        f"refused {run.refused}"
    )
    if run.samples:
        idle = run.idle_while_waiting / run.samples
        line += (
            f"; GPU idle while work waited at the door {idle:.1%} of {run.samples} samples (while a "
            f"request was inside the door, on its way: {run.idle_while_inside / run.samples:.1%}), door full "
            f"{run.door_full / run.samples:.0%}; goals worst < 3 s: {'PASS' if worst < 3 else 'FAIL'}, "
            f"idle < 5%: {'PASS' if idle < 0.05 else 'FAIL'}"
        )
    print(line, flush=True)
    if where:
        slow = sorted(zip(run.jobs, run.started, strict=True), reverse=True)[:5]
        print("  slowest jobs (s, started at s):", ", ".join(f"{d:.2f}@{t:.1f}" for d, t in slow))
        print("  idle samples (at s, door, gpu):", "; ".join(f"{t:.1f} {d} {g}" for t, d, g in run.idle_at[:20]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attackers", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=93.0)
    ap.add_argument("--period", type=float, default=31.0)
    ap.add_argument("--job-ms", type=int, default=100)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--where", action="store_true", help="also print the slowest jobs and the idle samples")
    args = ap.parse_args()
    job_s = args.job_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        d = Deployment(
            Path(tmp) / "splitspace",
            model=f"sleep:{args.job_ms}",
            trusted_proxies=0,
            quotas=bench_quotas({"behaved": (BEHAVED, "behaved")}, BEHAVED_TIER),
        ).start()
        try:
            run = asyncio.run(
                one_run(
                    d.frontend.url,
                    "generate",
                    ["a jam", "", 64, 64, 1, 0.0, 1],
                    {"authorization": f"Bearer {BEHAVED}"},
                    args.attackers,
                    args.seconds,
                    args.period,
                    (d.frontend.url, d.backend.url),
                )
            )
        finally:
            d.stop()
        report("splitspace", run, job_s, args.where)
        if not args.skip_baseline:
            backend, frontend = start_baseline(Path(tmp))
            try:
                run = asyncio.run(
                    one_run(
                        frontend.url,
                        "work",
                        [args.job_ms],
                        {"x-user": "behaved"},
                        args.attackers,
                        args.seconds,
                        args.period,
                        None,
                    )
                )
            finally:
                frontend.stop()
                backend.stop()
            report("plain Gradio", run, job_s, args.where)


if __name__ == "__main__":
    main()
