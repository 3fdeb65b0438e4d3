"""A developer's own app through splitspace's two tiers vs the same app file in one plain Gradio
tier (``python app.py``: Gradio's defaults, the decorator a no-op), both in the same run (issue 23).

Measured, each against plain Gradio serving the same function, same client (raw REST:
POST /gradio_api/call, then its event stream):
1. text (``examples/shout.py``): sequential p50 latency and what the two tiers add (goal
   <= +8 ms); throughput of ``--clients`` concurrent clients (distinct API keys) as a ratio to
   one plain tier (goal >= 0.6x);
2. image (``examples/mirror.py``): a 512x512 PNG uploaded, mirrored, the result downloaded;
   p50 added (goal <= +15 ms);
3. noisy neighbour (``bench/sleep_app.py``, a 100 ms ``@splitspace.gpu`` function): one client
   bursts 40 jobs, four light clients send one job each 0.2 s later (from another process); the
   lights' median wait in job times (goal <= 4); and, as a reference, the same burst on
   splitspace's built-in model (``sleep:100``, as bench/fairness.py) in the same run;
4. frontend memory: the frontend's RSS serving ``examples/text_to_image.py`` (``MODEL_ID=tiny``)
   after its GPU tier has loaded the model, vs a frontend with no app (the built-in model);
   goal <= +30 MB, and no torch or diffusers mapped in the frontend.

Rounds alternate between the systems, so that the machine's drift hits both alike; medians.

Run: python bench/app.py [--seq 40] [--rounds 3] [--clients 8] [--per-client 20] [--image-seq 20]
     [--burst-rounds 2] [--skip-builtin] [--skip-memory] [--only text|image|burst|memory ...]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Deployment, bench_quotas, free_port, median, rest_call, start_plain_gradio  # noqa: E402

SHOUT, MIRROR, SLEEP, T2I = (
    REPO / p for p in ("examples/shout.py", "examples/mirror.py", "bench/sleep_app.py", "examples/text_to_image.py")
)
JOB_S = 0.1
BURST, LIGHTS = 40, 4
PLAIN, SPLIT = "plain Gradio (one tier)", "splitspace (two tiers)"
BUILTIN = "splitspace built-in sleep:100 (ref)"


# -- the two systems -----------------------------------------------------------------------
def start_plain(app: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python app.py``, as its developer would run it, on a port of ours."""
    port = free_port()
    env = {"GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    proc = start_plain_gradio([str(app)], port, workdir / f"plain-{app.stem}.log", env)
    return proc, f"http://127.0.0.1:{port}"


def stop_plain(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def quotas(clients: int) -> str:
    names = ["one", "heavy", *(f"light{i}" for i in range(LIGHTS)), *(f"c{i}" for i in range(clients))]
    return bench_quotas(
        {n: (f"key-{n}", "bulk") for n in names},
        "\n[tiers.bulk]\nweight = 1\nmax_running = 1\nmax_queued = 1000\ngpu_seconds = 1e9\nwindow_s = 3600\n",
    )


def key(name: str) -> dict[str, str]:
    """An API key for splitspace; plain Gradio ignores the header (same request otherwise)."""
    return {"authorization": f"Bearer key-{name}"}


def app_deployment(app: Path, workdir: Path, clients: int, backend_env: dict[str, str] | None = None) -> Deployment:
    env = {"SPLITSPACE_APP": str(app)}
    return Deployment(
        workdir, quotas=quotas(clients), backend_env={**env, **(backend_env or {})}, frontend_env=dict(env)
    ).start()


# -- the calls -----------------------------------------------------------------------------
Call = Callable[[httpx.AsyncClient, str, dict[str, str]], Awaitable[bool]]


async def shout_call(c: httpx.AsyncClient, url: str, headers: dict[str, str]) -> bool:
    ok, out = await rest_call(c, url, "shout", ["hello", 2], headers)
    return ok and out == ["HELLO HELLO"]


def png_512() -> bytes:
    """A photo-like 512x512 picture: smooth gradients with some grain (a few hundred KB as PNG)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:512, 0:512]
    base = np.stack([x / 2, y / 2, (x + y) / 4], axis=-1)
    grain = np.random.default_rng(23).integers(0, 24, (512, 512, 3))
    buf = io.BytesIO()
    Image.fromarray((base + grain).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = b""


async def mirror_call(c: httpx.AsyncClient, url: str, headers: dict[str, str]) -> bool:
    """Upload the picture, call, download the mirrored picture (what gradio_client does)."""
    r = await c.post(f"{url}/gradio_api/upload", files=[("files", ("in.png", PNG, "image/png"))], headers=headers)
    if r.status_code != 200:
        return False
    picture = {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": "in.png"}
    ok, out = await rest_call(c, url, "mirror", [picture, False], headers)
    if not ok or not isinstance(out, list) or not isinstance(out[0], dict) or not out[0].get("url"):
        return False
    got = await c.get(out[0]["url"], headers=headers)
    # gr.Image's output format is WebP unless the app says otherwise; any encoded picture will do
    picture_magic = got.content[:8] == b"\x89PNG\r\n\x1a\n" or got.content[8:12] == b"WEBP"
    return got.status_code == 200 and picture_magic and len(got.content) > 1000


async def sequential(call: Call, url: str, n: int, headers: dict[str, str]) -> tuple[list[float], int]:
    async with httpx.AsyncClient(timeout=60) as c:
        for _ in range(3):  # warm up connections and caches
            await call(c, url, headers)
        times, fails = [], 0
        for _ in range(n):
            t0 = time.perf_counter()
            fails += not await call(c, url, headers)
            times.append(time.perf_counter() - t0)
    return times, fails


async def throughput(call: Call, url: str, clients: int, per_client: int) -> tuple[float, int]:
    """``clients`` concurrent clients (each its own key and connection pool), calls in turn: calls/s."""
    pools = [httpx.AsyncClient(timeout=120) for _ in range(clients)]
    try:
        await asyncio.gather(*(call(p, url, key(f"c{i}")) for i, p in enumerate(pools)))
        fails = 0

        async def client(i: int) -> None:
            nonlocal fails
            for _ in range(per_client):
                fails += not await call(pools[i], url, key(f"c{i}"))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return clients * per_client / (time.perf_counter() - t0), fails
    finally:
        for p in pools:
            await p.aclose()


def latency_rows(call: Call, systems: dict[str, str], seq: int, rounds: int) -> dict[str, tuple[float, int]]:
    """Median over rounds of each round's p50 (ms), and failures; systems interleaved."""
    p50s: dict[str, list[float]] = {s: [] for s in systems}
    fails = dict.fromkeys(systems, 0)
    for _ in range(rounds):
        for s, url in systems.items():
            times, f = asyncio.run(sequential(call, url, seq, key("one")))
            p50s[s].append(median(times) * 1000)
            fails[s] += f
    return {s: (median(p50s[s]), fails[s]) for s in systems}


# -- the noisy neighbour -------------------------------------------------------------------
GENERATE = ["bench", "", 64, 64, 1, 0.0, 1]  # the built-in model's call (sleep:100 holds the GPU 100 ms)


async def _timed(url: str, who: list[str], delay_s: float, builtin: bool = False) -> list[tuple[float, bool]]:
    await asyncio.sleep(delay_s)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:

        async def one(w: str) -> tuple[float, bool]:
            t0 = time.perf_counter()
            if builtin:
                ok, _ = await rest_call(c, url, "generate", GENERATE, key(w))
            else:
                ok, out = await rest_call(c, url, "work", [w], key(w))
                ok = ok and out == [w]
            return time.perf_counter() - t0, ok

        return await asyncio.gather(*(one(w) for w in who))


def _proc(url: str, who: list[str], start_at: float, builtin: bool, out: Any) -> None:
    out.put(asyncio.run(_timed(url, who, max(0.0, start_at - time.time()), builtin)))


def noisy_neighbour(url: str, builtin: bool = False) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q_heavy, q_light = ctx.Queue(), ctx.Queue()
    start = time.time() + 1.5  # both processes start up first, then go on the clock
    heavy = ctx.Process(target=_proc, args=(url, ["heavy"] * BURST, start, builtin, q_heavy))
    light = ctx.Process(target=_proc, args=(url, [f"light{i}" for i in range(LIGHTS)], start + 0.2, builtin, q_light))
    heavy.start(), light.start()
    heavy_res, light_res = q_heavy.get(timeout=300), q_light.get(timeout=300)
    heavy.join(), light.join()
    lat = [t for t, _ in light_res]
    return {
        "p50": median(lat),
        "worst": max(lat),
        "heavy": max(t for t, _ in heavy_res),
        "errors": sum(not ok for _, ok in heavy_res + light_res),
    }


# -- memory --------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except ImportError:  # the same figure, from /proc
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
        return int(status["VmRSS"].split()[0]) / 1024


def heavy_mapped(pid: int) -> list[str]:
    """torch or diffusers files mapped into the process (torch's libraries, if it was imported)."""
    maps = open(f"/proc/{pid}/maps").read()
    return [m for m in ("torch", "diffusers") if f"/{m}/" in maps or f"lib{m}" in maps]


def memory(workdir: Path) -> dict[str, Any]:
    builtin = Deployment(workdir / "builtin", model="sleep:0", quotas=quotas(0)).start()
    app = app_deployment(T2I, workdir / "t2i", 0, backend_env={"MODEL_ID": "tiny"})
    try:
        assert builtin.frontend is not None and app.frontend is not None and app.backend is not None

        async def generate() -> tuple[bool, Any]:
            async with httpx.AsyncClient(timeout=300) as c:
                await rest_call(c, builtin.frontend.url, "generate", ["m", "", 64, 64, 1, 0.0, 1], key("one"))
                return await rest_call(c, app.frontend.url, "generate", ["a cat", 1, 256, 0], key("one"), timeout_s=300)

        ok, out = asyncio.run(generate())
        return {
            "builtin": rss_mb(builtin.frontend.proc.pid),
            "app": rss_mb(app.frontend.proc.pid),
            "gpu_tier": rss_mb(app.backend.proc.pid),
            "ok": ok,
            "out": str(out)[:120],
            "heavy": heavy_mapped(app.frontend.proc.pid),
            "gpu_heavy": heavy_mapped(app.backend.proc.pid),
        }
    finally:
        app.stop()
        builtin.stop()


# -- the report ----------------------------------------------------------------------------
def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def run_pair(app: Path, work: Path, clients: int, body: Callable[[dict[str, str]], None]) -> None:
    d = app_deployment(app, work / app.stem, clients)
    plain, plain_url = start_plain(app, work)
    try:
        assert d.frontend is not None
        body({PLAIN: plain_url, SPLIT: d.frontend.url})
    finally:
        d.stop()
        stop_plain(plain)


def main() -> None:
    global PNG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=40, help="sequential text calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="sequential rounds, systems interleaved")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=20)
    ap.add_argument("--image-seq", type=int, default=20, help="sequential image calls per round")
    ap.add_argument("--burst-rounds", type=int, default=2, help="noisy-neighbour rounds per system")
    ap.add_argument(
        "--skip-builtin",
        action="store_true",
        help="leave out the built-in model's noisy neighbour (the reference for the app's)",
    )
    ap.add_argument("--skip-memory", action="store_true")
    sections = ("text", "image", "burst", "memory")
    ap.add_argument("--only", nargs="+", choices=sections, default=list(sections), help="run only these sections")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="splitspace-appbench-"))
    load0 = os.getloadavg()[0]
    t_start = time.monotonic()

    def text(systems: dict[str, str]) -> None:
        rows = latency_rows(shout_call, systems, args.seq, args.rounds)
        tps: dict[str, list[tuple[float, int]]] = {s: [] for s in systems}
        for _ in range(args.rounds):  # interleaved too: one short window is at the mercy of the machine
            for s, url in systems.items():
                tps[s].append(asyncio.run(throughput(shout_call, url, args.clients, args.per_client)))
        tp = {s: (median([r for r, _ in rs]), sum(f for _, f in rs)) for s, rs in tps.items()}
        print(
            f"\n== 1. text (examples/shout.py): sequential p50, median of {args.rounds} rounds of {args.seq}; "
            f"{args.clients} clients x {args.per_client}, median of {args.rounds} rounds =="
        )
        print(f"{'system':<26}{'p50 ms':>8}{'+ms':>7}{'calls/s':>9}{'tp x':>7}{'fails':>7}")
        (b50, _), (btp, _) = rows[PLAIN], tp[PLAIN]
        for s in systems:
            print(
                f"{s:<26}{rows[s][0]:>8.1f}{rows[s][0] - b50:>+7.1f}{tp[s][0]:>9.1f}{tp[s][0] / btp:>7.2f}"
                f"{rows[s][1] + tp[s][1]:>7}"
            )
        added, ratio = rows[SPLIT][0] - b50, tp[SPLIT][0] / btp
        print(
            f"goal: p50 added <= 8 ms: {added:+.1f} ms {verdict(added <= 8)}; "
            f"throughput >= 0.6x: {ratio:.2f}x {verdict(ratio >= 0.6)}"
        )

    def image(systems: dict[str, str]) -> None:
        rows = latency_rows(mirror_call, systems, args.image_seq, args.rounds)
        print(
            f"\n== 2. image (examples/mirror.py): a {len(PNG) // 1024} KB 512x512 PNG uploaded, mirrored, "
            f"downloaded (as WebP, gr.Image's default); p50, median of {args.rounds} rounds of {args.image_seq} =="
        )
        b50 = rows[PLAIN][0]
        for s in systems:
            print(f"{s:<26}{rows[s][0]:>8.1f} ms{rows[s][0] - b50:>+7.1f} ms  fails {rows[s][1]}")
        added = rows[SPLIT][0] - b50
        print(f"goal: p50 added <= 15 ms: {added:+.1f} ms {verdict(added <= 15)}")

    def burst(systems: dict[str, str]) -> None:
        builtin = (
            None
            if args.skip_builtin
            else Deployment(work / "builtin-sleep", model="sleep:100", quotas=quotas(args.clients)).start()
        )
        try:
            if builtin is not None:
                assert builtin.frontend is not None
                systems = {**systems, BUILTIN: builtin.frontend.url}
            for s, url in systems.items():  # one unmeasured call each: imports, first run
                asyncio.run(_timed(url, ["light0"], 0, s == BUILTIN))
            got: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
            for _ in range(args.burst_rounds):
                for s, url in systems.items():
                    got[s].append(noisy_neighbour(url, s == BUILTIN))
                    time.sleep(0.5)
        finally:
            if builtin is not None:
                builtin.stop()
        print(
            f"\n== 3. noisy neighbour (bench/sleep_app.py, 100 ms @splitspace.gpu): {BURST}-job burst + "
            f"{LIGHTS} lights 0.2 s later, median of {args.burst_rounds} rounds =="
        )
        print(f"{'system':<34}{'light p50':>18}{'light worst':>14}{'heavy total':>13}{'errors':>8}")
        summary = {}
        for s, rs in got.items():
            p50, worst, heavy = (median([r[k] for r in rs]) for k in ("p50", "worst", "heavy"))
            summary[s] = (p50, heavy)
            print(
                f"{s:<34}{p50:>7.3f} s ({p50 / JOB_S:4.1f} jobs){worst:>7.3f} s ({worst / JOB_S:4.1f})"
                f"{heavy:>11.2f} s{sum(r['errors'] for r in rs):>8}"
            )
        sp, bp = summary[SPLIT][0], summary[PLAIN][0]
        print(
            f"lights' p50 {sp / bp:.3f}x plain Gradio's; heavy total {summary[SPLIT][1] / summary[PLAIN][1]:.2f}x; "
            f"goal: light p50 <= 4 jobs: {sp / JOB_S:.1f} {verdict(sp <= 4 * JOB_S)}"
        )

    PNG = png_512()
    if "text" in args.only:
        run_pair(SHOUT, work, args.clients, text)
    if "image" in args.only:
        run_pair(MIRROR, work, args.clients, image)
    if "burst" in args.only:
        run_pair(SLEEP, work, args.clients, burst)
    if "memory" in args.only and not args.skip_memory:
        m = memory(work)
        print("\n== 4. frontend memory: examples/text_to_image.py (MODEL_ID=tiny) after one image vs the built-in ==")
        print(
            f"frontend RSS: no app {m['builtin']:.0f} MB, text_to_image {m['app']:.0f} MB "
            f"({m['app'] - m['builtin']:+.1f} MB); GPU tier with the model {m['gpu_tier']:.0f} MB; "
            f"call ok: {m['ok']}"
        )
        print(f"torch/diffusers mapped in the frontend: {m['heavy'] or 'none'} (GPU tier: {m['gpu_heavy'] or 'none'})")
        print(
            f"goal: +{m['app'] - m['builtin']:.1f} MB <= 30 MB and nothing heavy: "
            f"{verdict(m['app'] - m['builtin'] <= 30 and not m['heavy'] and m['ok'])}"
        )
        if not m["ok"]:
            print(f"the call failed: {m['out']}")
    print(
        f"\n(load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; {time.monotonic() - t_start:.0f} s; logs in {work})"
    )


if __name__ == "__main__":
    main()
