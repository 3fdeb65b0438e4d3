"""GPU benchmark: raw diffusers against the GPU tier served through both tiers, in one run.

1. Raw: the model spec's pipeline (default ``arch:sd-turbo``: Stable Diffusion
   2.1's architecture, random weights) called directly in this process at batch
   1, 4, 8 and 16, same size, steps and guidance as served. Per batch: images/s,
   p50/p95 latency per image (an image of a batch waits for the whole call),
   the UNet's time per denoising step (timed apart, with a device sync around
   each UNet call), the GPU's utilisation.
2. Served: both tiers started as processes on loopback (``splitspace.deploy.processes``'s
   ``Deployment``), the GPU tier batching across clients (``SPLITSPACE_MAX_BATCH``,
   ``SPLITSPACE_BATCH_WAIT_MS``), then 1, 4 and 16 concurrent clients, each with
   its own API key in an equal tier (fair share), each keeping ``IN_FLIGHT``
   requests outstanding through the frontend's REST API. Per row: images/s,
   p50/p95 latency per image (the client's round trip), the ratio to raw at the
   same batch as clients, the spread ((max - min) / mean) of the clients' GPU
   shares (their ``gpu_s``) and of their image counts, the GPU's utilisation and
   the mean ``gpu_s`` per image.

The raw model is freed before the tiers start; both never run at once (except
in ``--cpu-smoke``, which starts the tiers during the raw phase to save time). GPU
utilisation is NVML's (the share of time a kernel ran; a launch-bound model can
read high while its SMs idle), "n/a" on a CPU.

Goals (set for the second release, on a GPU): served with 16 clients >= 0.9x raw batch 16; one
client's p50 <= raw batch 1 + 10 ms; the 4 clients' shares within 5%.

Run on a GPU: python bench/gpu.py [--model arch:sd-turbo] [--size 512] [--seconds 20]
                  [--batch-wait-ms 5] [--compile] [--json figures.json]
CPU smoke (arch:sd-turbo@tiny, 64x64, under a minute): python bench/gpu.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Deployment, bench_quotas, pct, rest_call  # noqa: E402

PROMPTS = [
    "a red fox in snow",
    "a lighthouse at dusk, oil painting",
    "a bowl of ramen, photo",
    "an astronaut riding a horse",
]


# -- GPU utilisation ------------------------------------------------------------------------


class Utilisation:
    """The GPU's mean utilisation (%) over a ``with`` block, sampled in a thread; None on a CPU."""

    def __init__(self, device: str, every_s: float = 0.2) -> None:
        self.device = device
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> float | None:
        try:
            import torch

            return float(torch.cuda.utilization(0))  # NVML, through pynvml
        except Exception:  # noqa: BLE001 (no pynvml: ask nvidia-smi)
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        try:
            return float(out.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            value = self._sample()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> Utilisation:
        if self.device.startswith("cuda"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def progress(message: str) -> None:
    print(f"[bench/gpu] {message}", file=sys.stderr, flush=True)


def fmt_util(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


# -- raw ----------------------------------------------------------------------------------------


@dataclass
class RawRow:
    batch: int
    calls: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    step_ms: float
    gpu_util: float | None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def raw_rows(
    executor: Any,
    batches: list[int],
    size: int,
    steps: int,
    guidance: float,
    seconds: float,
    min_calls: int,
    warmup_calls: int = 2,
) -> list[RawRow]:
    """Call the pipeline directly at each batch size; what each call costs."""
    import torch

    pipe, device = executor.pipeline, executor.device

    def call(batch: int, seed0: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        pipe(
            prompt=[PROMPTS[i % len(PROMPTS)] for i in range(batch)],
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pil",
            generator=[torch.Generator().manual_seed(seed0 + i) for i in range(batch)],
        )
        _sync(device)
        return time.perf_counter() - t0

    rows = []
    for batch in batches:
        progress(f"raw batch {batch}")
        for _ in range(warmup_calls):  # allocator, cuDNN autotuning, caches
            call(batch, 0)
        times: list[float] = []
        with Utilisation(device) as util:
            start = time.perf_counter()
            while len(times) < min_calls or time.perf_counter() - start < seconds:
                times.append(call(batch, len(times) * batch))
        rows.append(
            RawRow(
                batch=batch,
                calls=len(times),
                images_per_s=batch * len(times) / sum(times),
                p50_ms=statistics.median(times) * 1000,
                p95_ms=pct(times, 95) * 1000,
                step_ms=unet_step_ms(
                    pipe, device, lambda batch=batch: call(batch, 0), calls=2 if device == "cpu" else 3
                ),
                gpu_util=util.mean,
            )
        )
    return rows


def unet_step_ms(pipe: Any, device: str, run: Any, calls: int = 3) -> float:
    """The median UNet call (one denoising step) over ``calls`` pipeline calls, synced on each side."""
    spans: list[float] = []
    starts: list[float] = []

    def before(module: Any, args: Any) -> None:
        _sync(device)
        starts.append(time.perf_counter())

    def after(module: Any, args: Any, output: Any) -> None:
        _sync(device)
        spans.append(time.perf_counter() - starts.pop())

    hooks = [pipe.unet.register_forward_pre_hook(before), pipe.unet.register_forward_hook(after)]
    try:
        for _ in range(calls):
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return statistics.median(spans) * 1000


# -- served --------------------------------------------------------------------------------------


@dataclass
class ServedRow:
    clients: int
    in_flight: int
    images: int
    failed: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    share_spread: float | None
    """(max - min) / mean of the clients' GPU seconds; None for one client."""
    images_spread: float | None
    """(max - min) / mean of the clients' image counts; None for one client."""
    gpu_s_per_image: float
    gpu_util: float | None
    errors: dict[str, int] = field(default_factory=dict)


def client_quotas(n: int, in_flight: int) -> str:
    tier = (
        f"\n[tiers.bench]\nweight = 1\nmax_running = 1\nmax_queued = {in_flight + 4}\n"
        "gpu_seconds = 1e9\nwindow_s = 3600\n"
    )
    return bench_quotas({f"c{i:02d}": (f"key-c{i:02d}", "bench") for i in range(n)}, tier)


async def served_row(
    url: str, clients: int, in_flight: int, size: int, steps: int, guidance: float, seconds: float, device: str
) -> ServedRow:
    limits = httpx.Limits(
        max_connections=clients * in_flight * 2 + 8, max_keepalive_connections=clients * in_flight * 2 + 8
    )
    latencies: list[float] = []
    gpu_s: dict[str, float] = {f"c{i:02d}": 0.0 for i in range(clients)}
    images: dict[str, int] = dict.fromkeys(gpu_s, 0)
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:

        def data(i: int, seed: int) -> list[Any]:
            return [PROMPTS[i % len(PROMPTS)], "", size, size, steps, guidance, seed]

        def headers(name: str) -> dict[str, str]:
            return {"authorization": f"Bearer key-{name}"}

        # Warm-up (unmeasured): every client once, so connections and caches are ready.
        await asyncio.gather(*(rest_call(http, url, "generate", data(i, i), headers(c)) for i, c in enumerate(gpu_s)))
        end = time.perf_counter() + seconds

        async def loop(i: int, name: str, lane: int) -> None:
            seed = 1000 * (i * in_flight + lane)
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    ok, payload = await rest_call(http, url, "generate", data(i, seed), headers(name))
                except httpx.HTTPError as exc:
                    ok, payload = False, type(exc).__name__
                seed += 1
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    gpu_s[name] += float(payload[1]["gpu_s"])
                    images[name] += 1
                else:
                    key = str(payload)[:80]
                    errors[key] = errors.get(key, 0) + 1

        with Utilisation(device) as util:
            start = time.perf_counter()
            await asyncio.gather(*(loop(i, name, lane) for i, name in enumerate(gpu_s) for lane in range(in_flight)))
            elapsed = time.perf_counter() - start
    shares = list(gpu_s.values())
    return ServedRow(
        clients=clients,
        in_flight=in_flight,
        images=len(latencies),
        failed=sum(errors.values()),
        images_per_s=len(latencies) / elapsed,
        p50_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
        p95_ms=pct(latencies, 95) * 1000,
        share_spread=spread(shares),
        images_spread=spread([float(n) for n in images.values()]),
        gpu_s_per_image=sum(shares) / len(latencies) if latencies else float("nan"),
        gpu_util=util.mean,
        errors=errors,
    )


def spread(values: list[float]) -> float | None:
    """(max - min) / mean: 0 when all are equal; None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / mean if mean > 0 else None


# -- the run ---------------------------------------------------------------------------------------


def parse_rows(text: str) -> list[tuple[int, int]]:
    """ "1x1,4x2,16x2" -> [(1, 1), (4, 2), (16, 2)]: clients x requests in flight each."""
    rows = []
    for part in text.split(","):
        clients, _, in_flight = part.strip().partition("x")
        rows.append((int(clients), int(in_flight or 1)))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="arch:sd-turbo")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's preset")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's preset")
    ap.add_argument("--batches", default="1,4,8,16", help="raw batch sizes")
    ap.add_argument(
        "--served",
        default="1x1,4x2,16x2",
        help="served rows: CLIENTSxIN_FLIGHT (requests each client keeps outstanding)",
    )
    ap.add_argument("--max-batch", type=int, default=16, help="SPLITSPACE_MAX_BATCH of the GPU tier")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="SPLITSPACE_BATCH_WAIT_MS of the GPU tier")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per served row")
    ap.add_argument("--raw-seconds", type=float, default=5.0, help="measured seconds per raw batch size")
    ap.add_argument("--raw-calls", type=int, default=5, help="at least this many raw calls per batch size")
    ap.add_argument(
        "--compile", action="store_true", help="compiled UNet on both sides (SPLITSPACE_COMPILE=1 for the GPU tier)"
    )
    ap.add_argument("--device", default=None, help="default: cuda if torch sees one, else cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="arch:sd-turbo@tiny on the CPU at 64x64, batches 1,4, rows 1x1,4x1, a few seconds each",
    )
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.model, args.size, args.device = "arch:sd-turbo@tiny", 64, "cpu"
        args.batches, args.served, args.max_batch = "1,4", "1x1,4x1", 4
        args.seconds, args.raw_seconds, args.raw_calls = 3.0, 0.5, 2

    t_run = time.perf_counter()
    import torch

    from splitspace.gpu_backend.workload.model import CompileConfig, ModelExecutor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(b) for b in args.batches.split(",")]
    served = parse_rows(args.served)
    backend_env = {"SPLITSPACE_MAX_BATCH": str(args.max_batch), "SPLITSPACE_BATCH_WAIT_MS": f"{args.batch_wait_ms:g}"}
    if args.compile:
        backend_env["SPLITSPACE_COMPILE"] = "1"
    if device == "cpu":
        backend_env["CUDA_VISIBLE_DEVICES"] = ""  # the GPU tier on the CPU too
    if args.cpu_smoke:
        # One intra-op thread on each side: on a shared CPU, torch's threads wait on each
        # other at every parallel region, and the tiny model ran 15x slower with 2 threads.
        torch.set_num_threads(1)
        backend_env["OMP_NUM_THREADS"] = "1"
    work = Path(tempfile.mkdtemp(prefix="splitspace-gpu-bench-"))
    deployment = Deployment(  # a GPU tier may take long to get ready (loading, compiling)
        work,
        model=args.model,
        quotas=client_quotas(max(c for c, _ in served), max(f for _, f in served)),
        backend_env=backend_env,
        ready_timeout_s=900.0,
    )
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        # On a GPU the tiers start after the raw phase, which must have the machine to
        # itself; the smoke run overlaps them (its CPU figures are not the point).
        starting = pool.submit(deployment.start) if args.cpu_smoke else None
        if starting is not None:
            progress(f"starting both tiers meanwhile (logs in {work})")
        progress(f"building {args.model} on {device}")
        compile_cfg = CompileConfig(width=args.size, height=args.size) if args.compile else None
        executor = ModelExecutor.from_spec(args.model, device, max_batch=max(batches), compile_unet=compile_cfg)
        steps = args.steps if args.steps is not None else executor.preset.steps
        guidance = args.guidance if args.guidance is not None else executor.preset.guidance_scale
        dtype = str(getattr(executor.pipeline.unet, "dtype", "?")).replace("torch.", "")
        raw = raw_rows(
            executor,
            batches,
            args.size,
            steps,
            guidance,
            args.raw_seconds,
            args.raw_calls,
            warmup_calls=1 if args.cpu_smoke else 2,
        )
        del executor
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if starting is None:
            progress(f"starting both tiers (logs in {work})")
            deployment.start()
        else:
            starting.result()
        rows = []
        for c, f in served:
            progress(f"served: {c} client(s) x {f} in flight")
            rows.append(
                asyncio.run(served_row(deployment.frontend.url, c, f, args.size, steps, guidance, args.seconds, device))
            )
    finally:
        pool.shutdown(wait=True)
        deployment.stop()

    by_batch = {r.batch: r for r in raw}

    def raw_for(clients: int) -> RawRow:
        return by_batch.get(clients) or max((r for r in raw if r.batch <= clients), key=lambda r: r.batch)

    print(
        f"\n== raw diffusers: {args.model}, {args.size}x{args.size}, {steps} step(s), guidance {guidance:g}, "
        f"{device} {dtype}{', compiled UNet' if args.compile else ''} =="
    )
    print(f"{'batch':>5}{'calls':>7}{'images/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'step ms':>9}{'GPU util':>10}")
    for r in raw:
        print(
            f"{r.batch:>5}{r.calls:>7}{r.images_per_s:>10.2f}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}"
            f"{r.step_ms:>9.2f}{fmt_util(r.gpu_util):>10}"
        )
    print(
        f"\n== served through both tiers: each client its own API key (equal tier), "
        f"SPLITSPACE_MAX_BATCH={args.max_batch}, SPLITSPACE_BATCH_WAIT_MS={args.batch_wait_ms:g}, "
        f"{args.seconds:g} s per row =="
    )
    print(
        f"{'clients':>7}{'in flight':>10}{'images':>8}{'images/s':>10}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'vs raw':>12}{'share sprd':>11}{'img sprd':>9}{'gpu_s/img':>11}{'GPU util':>10}{'failed':>8}"
    )
    for r in rows:
        base = raw_for(r.clients)
        shares = "-" if r.share_spread is None else f"{r.share_spread * 100:.1f}%"
        counts = "-" if r.images_spread is None else f"{r.images_spread * 100:.1f}%"
        print(
            f"{r.clients:>7}{r.in_flight:>10}{r.images:>8}{r.images_per_s:>10.2f}{r.p50_ms:>9.1f}"
            f"{r.p95_ms:>9.1f}{r.images_per_s / base.images_per_s:>7.2f}x b{base.batch:<3}{shares:>11}{counts:>9}"
            f"{r.gpu_s_per_image * 1000:>9.1f}ms{fmt_util(r.gpu_util):>10}{r.failed:>8}"
        )
        if r.errors:
            print(f"{'':>7}errors: {r.errors}")
    goals = goal_lines(raw, rows, by_batch)
    for line in goals:
        print(line)
    elapsed = time.perf_counter() - t_run
    print(
        f"(vs raw: served images/s over raw images/s at that batch; share sprd, img sprd: (max - min) / mean "
        f"of the clients' gpu_s and image counts; run took {elapsed:.0f} s)"
    )
    figures = {
        "model": args.model,
        "size": args.size,
        "steps": steps,
        "guidance": guidance,
        "device": device,
        "dtype": dtype,
        "compiled": args.compile,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "raw": [asdict(r) for r in raw],
        "served": [asdict(r) for r in rows],
        "goals": goals,
        "seconds": elapsed,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


def goal_lines(raw: list[RawRow], rows: list[ServedRow], by_batch: dict[int, RawRow]) -> list[str]:
    """The issue's three goals, where this run has the rows to judge them."""
    out = []
    served = {r.clients: r for r in rows}
    if 16 in served and 16 in by_batch:
        ratio = served[16].images_per_s / by_batch[16].images_per_s
        out.append(f"goal: 16 clients >= 0.9x raw batch 16: {ratio:.2f}x {'MET' if ratio >= 0.9 else 'MISSED'}")
    if 1 in served and 1 in by_batch:
        extra = served[1].p50_ms - by_batch[1].p50_ms
        out.append(
            f"goal: lone client p50 <= raw batch 1 + 10 ms: {extra:+.1f} ms {'MET' if extra <= 10 else 'MISSED'}"
        )
    if 4 in served and served[4].share_spread is not None:
        spread = served[4].share_spread
        out.append(f"goal: 4 clients' shares within 5%: {spread * 100:.1f}% {'MET' if spread <= 0.05 else 'MISSED'}")
    return out


if __name__ == "__main__":
    main()
