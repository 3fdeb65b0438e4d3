"""The crowd: N clients x 10 jobs queued at once, one light client 3 s later, splitspace vs plain Gradio.

Each of N API-key clients sends 10 jobs of 20 ms (``sleep:20``) at the same
moment through the public REST API (Gradio's ``/gradio_api/call`` flow); 3 s
later one light client sends one job from its own process (so the crowd's
thousands of open streams do not slow the light client's own event loop).
Reported per round, for splitspace through both tiers and for one plain
Gradio tier called directly (FIFO, concurrency 1, ``bench/baseline``):

- the light client's latency against its ideal fair wait (about one job per
  active client ahead of it: N x 20 ms);
- total time over GPU work (N x 10 x 20 ms);
- requests lost (anything but a result);
- CPU seconds and peak RSS of each tier; status messages per second that
  reached the crowd.

Goals (set for the second release, on a 2-core machine): at N = 200, in every round, light <= 2x
its ideal, total <= 1.25x the GPU work, 0 lost; at N = 500 everything
completes, 0 lost, light <= 3x its ideal.

Run: python bench/crowd.py [--clients 20 200 500] [--rounds 2] [--skip-baseline | --baseline-at 20 200] [--where]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Deployment, bench_quotas, median, start_baseline  # noqa: E402

JOB_MS = 20
PER_CLIENT = 10
LIGHT_AFTER_S = 3.0
GOALS: dict[int, tuple[float, float | None]] = {200: (2.0, 1.25), 500: (3.0, None)}
"""The second release's goals: N -> (light client's latency over its ideal, total over the GPU work)."""


def call_spec(system: str, url: str, who: str) -> tuple[str, str, list[Any], dict[str, str]]:
    if system == "baseline":
        return url, "work", [JOB_MS], {"x-user": who}
    return url, "generate", ["crowd", "", 64, 64, 1, 0.0, 1], {"authorization": f"Bearer key-{who}"}


async def _call(session: aiohttp.ClientSession, system: str, url: str, who: str) -> tuple[float, str, int, dict]:
    """(seconds, outcome, status messages seen, where the time went): outcome "ok" or what
    went wrong; the last says when the POST was answered and how long the job waited at the
    GPU (``info.queue_s``; splitspace only). The REST
    flow of curl (POST the call, read its event stream), with aiohttp: a crowd of thousands
    of streams in one httpx client costs its own process seconds of CPU (measured on a
    2-core machine: 160+ open streams delayed that client's own requests by about
    a second)."""
    u, api, data, headers = call_spec(system, url, who)
    t0 = time.perf_counter()
    statuses = 0
    where: dict[str, float] = {}
    try:
        async with session.post(f"{u}/gradio_api/call/{api}", json={"data": data}, headers=headers) as r:
            if r.status != 200:
                return time.perf_counter() - t0, f"HTTP {r.status}", 0, where
            event_id = (await r.json())["event_id"]
        where["post_s"] = time.perf_counter() - t0
        event = ""
        async with session.get(f"{u}/gradio_api/call/{api}/{event_id}", headers=headers) as s:
            async for raw in s.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "generating":
                        statuses += 1
                    elif event in ("complete", "error"):
                        payload = json.loads(line[5:].strip())
                        ok = event == "complete" and payload not in (None, [None])
                        if ok and isinstance(payload[-1], dict) and "queue_s" in payload[-1]:
                            where["gpu_queue_s"] = payload[-1]["queue_s"]
                        outcome = "ok" if ok else f"{event}: {str(payload)[:80]}"
                        return time.perf_counter() - t0, outcome, statuses, where
        return time.perf_counter() - t0, "stream ended", statuses, where
    except (TimeoutError, aiohttp.ClientError) as exc:
        return time.perf_counter() - t0, type(exc).__name__, statuses, where


async def _crowd(system: str, url: str, who: list[str], start_at: float) -> list[tuple[float, str, int, dict]]:
    connector = aiohttp.TCPConnector(limit=len(who) + 10)
    timeout = aiohttp.ClientTimeout(total=1800, sock_connect=60)
    trace = aiohttp.TraceConfig()
    connected: list[float] = []  # for the light client: when its connection was made

    async def on_connected(session: Any, ctx: Any, params: Any) -> None:
        connected.append(time.perf_counter())

    trace.on_connection_create_end.append(on_connected)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[trace]) as session:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_call(session, system, url, w) for w in who))
        if len(who) == 1 and connected:
            results[0][3]["connect_s"] = connected[0] - t0
        return results


def _proc(system: str, url: str, who: list[str], start_at: float, out: Any) -> None:
    out.put(asyncio.run(_crowd(system, url, who, start_at)))


def _cpu_rss(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, peak RSS in MB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return ticks / os.sysconf("SC_CLK_TCK"), int(hwm.split()[1]) / 1024


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Sampler:
    """Peak open file descriptors and RSS of each tier while a round runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_fds = {name: 0 for name in pids}
        self.peak_rss_mb = {name: 0.0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for name, pid in self.pids.items():
                self.peak_fds[name] = max(self.peak_fds[name], _fds(pid))
                rss = next(
                    (
                        int(line.split()[1]) / 1024
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS")
                    ),
                    0.0,
                )
                self.peak_rss_mb[name] = max(self.peak_rss_mb[name], rss)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_round(system: str, url: str, n: int, pids: dict[str, int]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q_crowd, q_light = ctx.Queue(), ctx.Queue()
    crowd = [f"c{i:03d}" for i in range(n) for _ in range(PER_CLIENT)]
    start = time.time() + 2.0
    before = {name: _cpu_rss(pid)[0] for name, pid in pids.items()}
    idle_rss = {name: _rss_now(pid) for name, pid in pids.items()}
    p_crowd = ctx.Process(target=_proc, args=(system, url, crowd, start, q_crowd))
    p_light = ctx.Process(target=_proc, args=(system, url, ["light"], start + LIGHT_AFTER_S, q_light))
    with Sampler(pids) as sampler:
        p_crowd.start(), p_light.start()
        crowd_res = q_crowd.get(timeout=1800)
        light_res = q_light.get(timeout=1800)
        p_crowd.join(), p_light.join()
    total = max(t for t, _, _, _ in crowd_res)
    lost = [o for _, o, _, _ in crowd_res + light_res if o != "ok"]
    after = {name: _cpu_rss(pid) for name, pid in pids.items()}
    return {
        "light_s": light_res[0][0],
        "light_ok": light_res[0][1] == "ok",
        "light_where": light_res[0][3],
        "total_s": total,
        "lost": len(lost),
        "lost_kinds": sorted(set(lost))[:3],
        "statuses_per_s": sum(s for _, _, s, _ in crowd_res) / total if total else 0.0,
        "cpu": {name: after[name][0] - before[name] for name in pids},
        "rss_mb": {name: after[name][1] for name in pids},
        "fds": sampler.peak_fds,
        "kb_per_request": {name: (sampler.peak_rss_mb[name] - idle_rss[name]) * 1024 / len(crowd) for name in pids},
    }


def _rss_now(pid: int) -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def quotas(n: int) -> str:
    tier = "\n[tiers.crowd]\nweight = 1\nmax_running = 1\nmax_queued = 20\ngpu_seconds = 1000000\nwindow_s = 3600\n"
    keys = {f"c{i:03d}": (f"key-c{i:03d}", "crowd") for i in range(n)} | {"light": ("key-light", "crowd")}
    return bench_quotas(keys, tier)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[20, 200, 500])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument(
        "--baseline-at",
        type=int,
        nargs="+",
        help="run plain Gradio only at these N (it needs about 8x the GPU work: 5 min at N = 200)",
    )
    ap.add_argument("--where", action="store_true", help="also say where the light client's time went")
    ap.add_argument("--backend-env", default="", help="extra GPU tier settings, e.g. SPLITSPACE_MAX_BATCH=1")
    ap.add_argument("--frontend-env", default="", help="extra frontend settings, e.g. SPLITSPACE_DOOR_PER_FLOW=1")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="splitspace-crowd-"))
    seen: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    job = JOB_MS / 1000
    print(
        f"{'system':<11}{'N':>5}{'light':>9}{'ideal':>7}{'x ideal':>8}{'total/GPU':>10}{'lost':>6}"
        f"{'status/s':>9}  CPU s / peak RSS MB / peak fds / KB per waiting request (frontend, GPU tier)"
    )
    for n in args.clients:
        extra = dict(kv.split("=", 1) for kv in args.backend_env.split() if "=" in kv)
        front = dict(kv.split("=", 1) for kv in args.frontend_env.split() if "=" in kv)
        split = Deployment(
            work / f"split-{n}", model=f"sleep:{JOB_MS}", quotas=quotas(n), backend_env=extra, frontend_env=front
        ).start()
        systems: list[tuple[str, str, dict[str, int]]] = [
            ("splitspace", split.frontend.url, {"frontend": split.frontend.proc.pid, "gpu": split.backend.proc.pid})
        ]
        base = None
        if not args.skip_baseline and (args.baseline_at is None or n in args.baseline_at):
            base = start_baseline(work)
            systems.append(("baseline", base[0].url, {"gpu": base[0].proc.pid}))
        try:
            for _ in range(args.rounds):
                for system, url, pids in systems:
                    r = one_round(system, url, n, pids)
                    ideal = n * job
                    gpu_work = n * PER_CLIENT * job
                    cpu = ", ".join(f"{r['cpu'][k]:.1f}" for k in pids)
                    rss = ", ".join(f"{r['rss_mb'][k]:.0f}" for k in pids)
                    fds = ", ".join(f"{r['fds'][k]}" for k in pids)
                    kb = ", ".join(f"{r['kb_per_request'][k]:.0f}" for k in pids)
                    light = f"{r['light_s']:.2f}s" + ("" if r["light_ok"] else "!")
                    print(
                        f"{system:<11}{n:>5}{light:>9}{ideal:>6.1f}s{r['light_s'] / ideal:>8.2f}"
                        f"{r['total_s'] / gpu_work:>10.2f}{r['lost']:>6}{r['statuses_per_s']:>9.0f}  "
                        f"{cpu} / {rss} / {fds} / {kb}" + (f"  lost: {r['lost_kinds']}" if r["lost"] else ""),
                        flush=True,
                    )
                    if args.where:
                        print(
                            "    light: " + ", ".join(f"{k} {v:.2f}" for k, v in r["light_where"].items()), flush=True
                        )
                    seen.setdefault((system, n), []).append(
                        (r["light_s"] / ideal if r["light_ok"] else float("inf"), r["total_s"] / gpu_work, r["lost"])
                    )
                    time.sleep(1.0)
        finally:
            split.stop()
            if base is not None:
                base[0].stop(), base[1].stop()
    summary(seen)


def summary(seen: dict[tuple[str, int], list[tuple[float, float, int]]]) -> None:
    """Median and worst over the rounds, and splitspace's goals (second release) at N = 200 and 500."""
    print("\nover the rounds (median / worst):")
    for (system, n), rows in seen.items():
        light, total, lost = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        line = (
            f"  {system:<11}{n:>5}  light {median(light):.2f} / {max(light):.2f} x ideal, "
            f"total {median(total):.2f} / {max(total):.2f} x GPU, lost {sum(lost)} in {len(rows)} rounds"
        )
        if system == "splitspace" and n in GOALS:
            light_goal, total_goal = GOALS[n]
            ok = max(light) <= light_goal and (total_goal is None or max(total) <= total_goal) and not sum(lost)
            line += (
                f"  goal (every round: light <= {light_goal}x"
                + (f", total <= {total_goal}x" if total_goal else "")
                + f", 0 lost): {'PASS' if ok else 'FAIL'}"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
