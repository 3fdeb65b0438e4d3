"""Hop benchmark: what the second tier costs, splitspace vs plain Gradio.

Measured in one run, on this machine, against bench/baseline/:
- sequential latency of raw REST calls (POST /gradio_api/call, then its event stream):
  the baseline's /echo direct (one plain tier), the baseline's /echo through its
  gradio_client frontend, and splitspace's /generate with `sleep:0` through both tiers;
- CPU per call of the tier that forwards (and of one plain tier, for the ratio);
- throughput with 64 concurrent callers, and failed calls;
- frontend memory and threads with N callers waiting on a slow GPU tier.

Run: python bench/hop.py [--seq 200] [--rounds 3] [--callers 64] [--per-caller 10] [--waiting 500]
     [--skip-baseline-client]
Zero failures in 5,000 calls: python bench/hop.py --per-caller 80 --waiting 0 --skip-baseline-client
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Deployment, bench_quotas, median, pct, rest_call, start_baseline  # noqa: E402

GEN = ["hop", "", 64, 64, 1, 0.0, 1]


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_threads(pid: int) -> tuple[float, int]:
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["Threads"])


async def sequential(url: str, api: str, data: list[Any], n: int, pid: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=60) as c:
        for _ in range(10):  # warm up connections and caches
            await rest_call(c, url, api, data, {})
        times, fails = [], 0
        cpu0 = cpu_seconds(pid)
        for _ in range(n):
            t0 = time.perf_counter()
            ok, _ = await rest_call(c, url, api, data, {})
            times.append(time.perf_counter() - t0)
            fails += not ok
        cpu = (cpu_seconds(pid) - cpu0) / n
    return {"p50_ms": median(times) * 1000, "p95_ms": pct(times, 95) * 1000, "cpu_ms": cpu * 1000, "fails": fails}


async def throughput(
    url: str, api: str, data: list[Any], callers: int, per_caller: int, headers: dict[str, str]
) -> dict[str, float]:
    limits = httpx.Limits(max_connections=callers * 2, max_keepalive_connections=callers * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await asyncio.gather(*(rest_call(c, url, api, data, headers) for _ in range(callers)))
        fails = 0
        errors: dict[str, int] = {}

        async def caller() -> None:
            nonlocal fails
            for _ in range(per_caller):
                try:
                    ok, payload = await rest_call(c, url, api, data, headers)
                except httpx.HTTPError as exc:
                    ok, payload = False, type(exc).__name__
                if not ok:
                    fails += 1
                    key = str(payload)[:80]
                    errors[key] = errors.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - t0
    return {"calls_s": callers * per_caller / elapsed, "fails": fails, "calls": callers * per_caller, "errors": errors}


async def waiting_memory(d: Deployment, n: int) -> dict[str, float]:
    """n callers waiting on a slow GPU tier: the frontend's RSS and threads."""
    pid = d.frontend.proc.pid
    rss0, th0 = rss_threads(pid)
    limits = httpx.Limits(max_connections=n * 2 + 10, max_keepalive_connections=n * 2 + 10)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        headers = {"authorization": "Bearer key-waiter"}
        tasks = [asyncio.create_task(rest_call(c, d.frontend.url, "generate", GEN, headers)) for _ in range(n)]
        await asyncio.sleep(8.0)  # all joined and waiting
        rss1, th1 = rss_threads(pid)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"rss0_mb": rss0, "rss_mb": rss1, "threads0": th0, "threads": th1}


QUOTAS = bench_quotas(
    {"hop": ("key-hop", "bulk"), "waiter": ("key-waiter", "bulk")},
    "\n[tiers.bulk]\nweight = 1\nmax_running = 1\nmax_queued = 100000\ngpu_seconds = 1e9\nwindow_s = 3600\n"
    "\n[tiers.anonymous]\nmax_queued = 100000\ngpu_seconds = 1e9\naddress_gpu_seconds = 1e9\n"
    "requests_per_minute = 1000000\n",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="sequential rounds, systems interleaved; medians reported")
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--per-caller", type=int, default=10)
    ap.add_argument("--waiting", type=int, default=500)
    ap.add_argument(
        "--skip-baseline-client",
        action="store_true",
        help="leave out the baseline through gradio_client (slow; e.g. for --per-caller 80)",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="splitspace-hop-"))
    base_backend, base_frontend = start_baseline(work)
    systems: list[tuple[str, str, str, list[Any], int, Any]] = [
        ("baseline direct", base_backend.url, "echo", ["x"], base_backend.proc.pid, None),
        ("baseline via gradio_client", base_frontend.url, "echo", ["x"], base_frontend.proc.pid, None),
    ][: 1 if args.skip_baseline_client else 2]
    splitspace = Deployment(work / "splitspace", model="sleep:0", quotas=QUOTAS).start()
    systems.append(("splitspace", splitspace.frontend.url, "generate", GEN, splitspace.frontend.proc.pid, splitspace))
    try:
        rows: dict[str, dict[str, Any]] = {}
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in systems}
        for _ in range(args.rounds):  # interleaved, so that the machine's drift hits every system alike
            for name, url, api, data, pid, _d in systems:
                rounds[name].append(asyncio.run(sequential(url, api, data, args.seq, pid)))
        for name, seqs in rounds.items():
            rows[name] = {"seq": {k: median([s[k] for s in seqs]) for k in seqs[0]}}
        for name, url, api, data, _pid, d in systems:
            headers = {"authorization": "Bearer key-hop"} if d is not None else {}
            rows[name]["tp"] = asyncio.run(throughput(url, api, data, args.callers, args.per_caller, headers))
        base = rows["baseline direct"]
        print(
            f"\n== hop: sequential raw REST calls (median of {args.rounds} interleaved rounds of {args.seq}) "
            f"and {args.callers} callers x {args.per_caller} =="
        )
        print(
            f"{'system':<28}{'p50 ms':>8}{'p95 ms':>8}{'+p50 ms':>9}{'cpu/call':>10}{'cpu x':>7}"
            f"{'calls/s':>9}{'tp x':>6}{'fails':>7}"
        )
        for name, r in rows.items():
            s, t = r["seq"], r["tp"]
            print(
                f"{name:<28}{s['p50_ms']:>8.1f}{s['p95_ms']:>8.1f}{s['p50_ms'] - base['seq']['p50_ms']:>9.1f}"
                f"{s['cpu_ms']:>8.1f}ms{s['cpu_ms'] / base['seq']['cpu_ms']:>7.2f}{t['calls_s']:>9.1f}"
                f"{t['calls_s'] / base['tp']['calls_s']:>6.2f}{t['fails']:>4}/{t['calls']}"
            )
            if t["errors"]:
                print(f"{'':<28}errors: {t['errors']}")
        print(
            "(+p50: added over one plain tier called directly; cpu/call: the CPU of the tier that "
            "receives the call; cpu x and tp x: ratios to one plain tier)"
        )
        if args.waiting:
            splitspace.stop()
            slow = Deployment(work / "slow", model="sleep:60000", quotas=QUOTAS).start()
            try:
                m = asyncio.run(waiting_memory(slow, args.waiting))
                print(f"\n== {args.waiting} callers waiting on a slow GPU tier ==")
                print(
                    f"frontend RSS {m['rss0_mb']:.0f} -> {m['rss_mb']:.0f} MB "
                    f"({(m['rss_mb'] - m['rss0_mb']) * 1024 / args.waiting:.0f} KB per waiting call); "
                    f"threads {m['threads0']} -> {m['threads']}"
                )
            finally:
                slow.stop()
    finally:
        splitspace.stop()
        base_frontend.stop()
        base_backend.stop()


if __name__ == "__main__":
    main()
