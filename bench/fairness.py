"""Fairness benchmark: the noisy-neighbour workload and a many-client case, splitspace vs plain Gradio.

1. The noisy neighbour: one client bursts 40 jobs of 100 ms; 0.2 s later four
   light clients send one job each (from a separate process, so the burst's
   open streams do not slow the lights' own client). Reported: the lights'
   median and worst latency in job times, the heavy client's total.
2. Many clients: 20 clients with Zipf-distributed demand (open-loop Poisson
   arrivals, 150% of the GPU in total) and mixed weights (1, 2, 4). Each
   client's GPU share is compared with its weighted max-min fair share (an
   independent water-filling oracle); reported: Jain's fairness index over
   share / fair share (1.0 = perfectly fair).

Both systems get one unmeasured warm-up round first (--warmup), then the rounds
alternate between them, so that the machine's drift hits both alike.

Run: python bench/fairness.py [--rounds 3] [--warmup 1] [--many-seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from splitspace.gpu_backend.admission.fair_share import weighted_max_min  # noqa: E402

from common import Deployment, bench_quotas, median, rest_call, start_baseline  # noqa: E402

JOB_MS = 100
BURST = 40
LIGHTS = 4


# -- how each system is called ------------------------------------------------------------
def call_spec(system: str, url: str, who: str, job_ms: int) -> tuple[str, str, list[Any], dict[str, str]]:
    if system == "baseline":
        return url, "work", [job_ms], {"x-user": who}
    return url, "generate", ["bench", "", 64, 64, 1, 0.0, 1], {"authorization": f"Bearer key-{who}"}


async def _timed_calls(system: str, url: str, who: list[str], job_ms: int, delay_s: float) -> list[tuple[float, bool]]:
    await asyncio.sleep(delay_s)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one(w: str) -> tuple[float, bool]:
            u, api, data, headers = call_spec(system, url, w, job_ms)
            t0 = time.perf_counter()
            ok, _ = await rest_call(client, u, api, data, headers)
            return time.perf_counter() - t0, ok

        return await asyncio.gather(*(one(w) for w in who))


def _proc(system: str, url: str, who: list[str], job_ms: int, start_at: float, out: Any) -> None:
    delay = max(0.0, start_at - time.time())
    out.put(asyncio.run(_timed_calls(system, url, who, job_ms, delay)))


def noisy_neighbour(system: str, url: str) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q_heavy, q_light = ctx.Queue(), ctx.Queue()
    start = time.time() + 1.5  # both processes warm up first, then start on the clock
    heavy = ctx.Process(target=_proc, args=(system, url, ["heavy"] * BURST, JOB_MS, start, q_heavy))
    light = ctx.Process(
        target=_proc, args=(system, url, [f"light{i}" for i in range(LIGHTS)], JOB_MS, start + 0.2, q_light)
    )
    heavy.start(), light.start()
    heavy_res, light_res = q_heavy.get(timeout=300), q_light.get(timeout=300)
    heavy.join(), light.join()
    lat = [t for t, _ in light_res]
    errors = sum(not ok for _, ok in heavy_res + light_res)
    return {
        "light_p50_s": median(lat),
        "light_max_s": max(lat),
        "heavy_total_s": max(t for t, _ in heavy_res),
        "errors": errors,
    }


# -- many clients ------------------------------------------------------------------------------
N_CLIENTS = 20
MANY_JOB_MS = 50
WEIGHTS = [1, 2, 4]


def many_clients_plan(seed: int = 7) -> tuple[dict[str, float], dict[str, float]]:
    """Demand in GPU-seconds per second (Zipf, 1.5x the GPU in total) and weights per client."""
    rng = random.Random(seed)
    zipf = [1 / (i + 1) for i in range(N_CLIENTS)]
    total = sum(zipf)
    demand = {f"c{i:02d}": 1.5 * z / total for i, z in enumerate(zipf)}
    weights = {c: float(rng.choice(WEIGHTS)) for c in demand}
    return demand, weights


async def _open_loop(
    system: str,
    url: str,
    clients: list[str],
    demand: dict[str, float],
    seconds: float,
    out_gpu: dict[str, float],
    out_offered: dict[str, float],
) -> None:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    job_s = MANY_JOB_MS / 1000
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t_end = time.perf_counter() + seconds

        async def one(c: str) -> None:
            u, api, data, headers = call_spec(system, url, c, MANY_JOB_MS)
            ok, payload = await rest_call(client, u, api, data, headers)
            if ok and time.perf_counter() <= t_end:  # count service delivered inside the window
                out_gpu[c] += job_s

        async def arrivals(c: str) -> None:
            rng = random.Random(hash(c) & 0xFFFF)
            rate = demand[c] / job_s  # jobs per second
            tasks = []
            while True:
                await asyncio.sleep(rng.expovariate(rate))
                if time.perf_counter() >= t_end:
                    break
                out_offered[c] += job_s  # the demand actually offered (Poisson arrivals vary)
                tasks.append(asyncio.create_task(one(c)))
            for t in tasks:
                t.cancel()  # what has not finished in the window is not counted
            await asyncio.gather(*tasks, return_exceptions=True)

        await asyncio.gather(*(arrivals(c) for c in clients))


def _many_proc(
    system: str, url: str, clients: list[str], demand: dict[str, float], seconds: float, start_at: float, out: Any
) -> None:
    gpu = {c: 0.0 for c in clients}
    offered = {c: 0.0 for c in clients}
    time.sleep(max(0.0, start_at - time.time()))
    asyncio.run(_open_loop(system, url, clients, demand, seconds, gpu, offered))
    out.put((gpu, offered))


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs else float("nan")


def many_clients(system: str, url: str, seconds: float) -> dict[str, Any]:
    demand, weights = many_clients_plan()
    clients = sorted(demand)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = time.time() + 1.5
    halves = [clients[0::2], clients[1::2]]  # two load processes: one client holding hundreds of streams is slow
    procs = [ctx.Process(target=_many_proc, args=(system, url, h, demand, seconds, start, q)) for h in halves]
    for p in procs:
        p.start()
    got: dict[str, float] = {}
    offered: dict[str, float] = {}
    for _ in procs:
        g, o = q.get(timeout=seconds + 300)
        got.update(g)
        offered.update(o)
    for p in procs:
        p.join()
    served = {c: got[c] / seconds for c in clients}
    capacity = sum(served.values())
    # The oracle gets the demand each client actually offered and the GPU time actually delivered.
    fair = weighted_max_min({c: offered[c] / seconds for c in clients}, weights, capacity)
    ratios = [served[c] / fair[c] for c in clients if fair[c] > 0]
    return {"jain": jain(ratios), "capacity_used": capacity, "worst_ratio": min(ratios), "best_ratio": max(ratios)}


WEIGHT_TIERS = "".join(
    f"\n[tiers.w{w}]\nweight = {w}\nmax_running = 1\nmax_queued = 100\ngpu_seconds = 100000\nwindow_s = 3600\n"
    for w in WEIGHTS
)


def splitspace_quotas() -> str:
    keys = {"heavy": ("key-heavy", "w1")} | {f"light{i}": (f"key-light{i}", "w1") for i in range(LIGHTS)}
    _, weights = many_clients_plan()
    keys |= {c: (f"key-{c}", f"w{int(w)}") for c, w in weights.items()}
    return bench_quotas(keys, WEIGHT_TIERS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per system first (connections, caches)")
    ap.add_argument("--many-seconds", type=float, default=30.0)
    ap.add_argument("--skip-many", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true", help="splitspace only (for A/B runs)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="splitspace-bench-"))
    base_backend, base_frontend = start_baseline(work)
    split = Deployment(work / "splitspace", model=f"sleep:{JOB_MS}", quotas=splitspace_quotas()).start()
    try:
        rows: dict[str, list[dict[str, float]]] = {"baseline": [], "splitspace": []}
        for r in range(args.warmup + args.rounds):
            for system, url in (("baseline", base_frontend.url), ("splitspace", split.frontend.url)):
                if system == "baseline" and args.skip_baseline:
                    continue
                result = noisy_neighbour(system, url)
                if r >= args.warmup:
                    rows[system].append(result)
                time.sleep(1.0)
        job = JOB_MS / 1000
        print(
            f"\n== noisy neighbour: {BURST}-job burst + {LIGHTS} lights, {JOB_MS} ms jobs, through both tiers, "
            f"median of {args.rounds} rounds =="
        )
        print(f"{'system':<12}{'light p50':>12}{'light worst':>13}{'heavy total':>13}{'errors':>8}")
        summary = {}
        for system, rs in rows.items():
            if not rs:
                continue
            p50 = median([x["light_p50_s"] for x in rs])
            worst = median([x["light_max_s"] for x in rs])
            total = median([x["heavy_total_s"] for x in rs])
            errs = sum(x["errors"] for x in rs)
            summary[system] = (p50, worst, total)
            print(
                f"{system:<12}{p50:>8.3f} s ({p50 / job:4.1f} jobs){worst:>7.3f} s ({worst / job:4.1f})"
                f"{total:>9.2f} s{errs:>8}"
            )
        (bp, bw, bt) = summary.get("baseline", (float("nan"),) * 3)
        (sp, sw, st) = summary["splitspace"]
        print(
            f"ratios splitspace/baseline: light p50 {sp / bp:.3f}, light worst {sw / bw:.3f}, heavy total {st / bt:.3f}"
        )
        print(
            f"goal: light p50 <= 4 jobs: {'MET' if sp <= 4 * job else 'MISSED'}; worst <= 6 jobs: "
            f"{'MET' if sw <= 6 * job else 'MISSED'}; heavy within 5% of baseline: "
            f"{'MET' if st <= 1.05 * bt else 'MISSED'}"
        )
        if not args.skip_many:
            split.stop()
            split_many = Deployment(work / "many", model=f"sleep:{MANY_JOB_MS}", quotas=splitspace_quotas()).start()
            try:
                print(
                    f"\n== many clients: {N_CLIENTS} clients, Zipf demand (1.5x the GPU), weights {WEIGHTS}, "
                    f"{MANY_JOB_MS} ms jobs, {args.many_seconds:.0f} s =="
                )
                for system, url in (("baseline", base_frontend.url), ("splitspace", split_many.frontend.url)):
                    m = many_clients(system, url, args.many_seconds)
                    print(
                        f"{system:<12} Jain index {m['jain']:.3f}  (share/fair share from {m['worst_ratio']:.2f} "
                        f"to {m['best_ratio']:.2f}; GPU busy {m['capacity_used'] * 100:.0f}%)"
                    )
                    time.sleep(2)
            finally:
                split_many.stop()
    finally:
        split.stop()
        base_frontend.stop()
        base_backend.stop()


if __name__ == "__main__":
    main()
