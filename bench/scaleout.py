"""Scale-out benchmark: the Redis store's cost, and what a second GPU tier buys.

Three parts, selectable with ``--part`` (default all):

1. **A job's store steps per second on each store.** What each of the three store calls
   of a job costs on each shared store: the memory store (Redis' stand-in during an
   outage) and Redis (blocking client; the asyncio client, which admission uses on the
   event loop, for ``admit``). Each operation is one caller's round trip, run back to back
   for ``--seconds`` on one thread (one event loop for the async store), so the figure is
   the inverse of its latency. Operations: ``admit`` (rate, queued slot and GPU-second
   reservation in one call, a fresh job id over 1000 clients with ``requests_per_minute =
   100``: admissions, then refusals once a window is full), ``start_job`` (the running slot
   and the service charge), ``settle`` (both leases and the usage correction). Then
   one job's store work on Redis as a GPU tier does it (``GlobalLimits`` admit, start and
   finish over the failover wrappers): milliseconds per step and the Redis round trips of
   each (counted with ``INFO commandstats``), for an anonymous caller and an API key.
2. **Noisy neighbour on 1 and 2 GPU tiers**, Redis on in both (so the number of tiers is the
   only difference): one frontend whose ``SPLITSPACE_BACKEND_URL`` lists the tiers, model
   ``sleep:100``; a heavy API key (``max_running = 4``) bursts 40 jobs, 0.2 s later four light
   keys send one job each (bench/fairness.py's workload, from separate processes). Goals:
   the 2-tier heavy total at most 0.575x the 1-tier one (half, within 15 %), the lights'
   p50 and worst on two tiers within 4 job times (one tier's are shown for reference;
   ``--with-sqlite`` adds one tier without Redis).
3. **Added latency of Redis on the hop**: sequential single calls through a frontend to one
   GPU tier (``sleep:0``), the SQLite default vs ``SPLITSPACE_REDIS_URL`` set, an anonymous
   caller (the most store work: rate, queue, client and address quotas) and an API key;
   each call to one deployment is followed by one to the other (A, B, B, A, ...), so the
   machine's drift hits both alike. Goal: Redis at most 2 ms over SQLite at p50.

    python bench/scaleout.py [--part 1 2 3] [--seconds 1.0] [--redis-url URL]
                             [--rounds 3] [--warmup 1] [--with-sqlite] [--seq 200]
                             [--hop-model sleep:0]

Parts 2 and 3 run real tiers (``python -m splitspace.deploy.cli``) on loopback and a throwaway
``redis-server``; part 1 uses ``--redis-url`` when given, else its own ``redis-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from splitspace.deploy.processes import Deployment, TierProcess, free_port, start_tier  # noqa: E402
from splitspace.deploy.redis_local import LocalRedis  # noqa: E402
from splitspace.gpu_backend.admission.scheduler import ClientRef  # noqa: E402
from splitspace.gpu_backend.stores.redis_store import RedisStore  # noqa: E402
from splitspace.gpu_backend.stores.resilient_store import ResilientStore  # noqa: E402
from splitspace.gpu_backend.stores.usage import AdmitPlan, MemoryUsageStore, Reservation  # noqa: E402
from splitspace.shared.contract.quotas import Tier  # noqa: E402

from common import bench_quotas, median, pct, rest_call  # noqa: E402

OPS = ("admit", "start_job", "settle")
CLIENTS, RPM = 1000, 100
"""admit spreads over this many clients with requests_per_minute = RPM: windows hold at
most RPM entries, and once a client's is full its admissions are refusals, as in service."""


def plan(i: int) -> AdmitPlan:
    return AdmitPlan(
        key=f"key:c{i % CLIENTS}",
        job_id=f"j{i}",
        max_queued=10**9,
        lease_s=30.0,
        reservations=(Reservation("key:bench", 0.5, float("inf"), 3600.0),),
        rate_limit=RPM,
    )


def sync_ops(store: Any) -> dict[str, Callable[[int], None]]:
    def admit(i: int) -> None:
        store.admit(plan(i))

    def start(i: int) -> None:
        store.start_job(f"key:c{i % CLIENTS}", f"j{i}", 10**9, 30.0, 0.5, "__vtime__")

    def settle(i: int) -> None:
        store.settle(f"key:c{i % CLIENTS}", f"j{i}", [("key:bench", -0.1)])

    return dict(zip(OPS, (admit, start, settle), strict=True))


def async_ops(store: RedisStore) -> dict[str, Callable[[int], Awaitable[None]]]:
    async def admit(i: int) -> None:
        await store.admit_async(plan(i))

    return {"admit": admit}


def rate_of(op: Callable[[int], None], seconds: float) -> float:
    for i in range(50):  # warm up (script loading, SQLite pages)
        op(-i - 1)
    counter = itertools.count()
    start = time.perf_counter()
    done = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            op(next(counter))
        done += 20
    return done / elapsed


async def async_rate_of(op: Callable[[int], Awaitable[None]], seconds: float) -> float:
    for i in range(50):
        await op(-i - 1)
    counter = itertools.count()
    start = time.perf_counter()
    done = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            await op(next(counter))
        done += 20
    return done / elapsed


# -- one job's store work, as a GPU tier does it (GlobalLimits on the failover wrappers) ------
JOB_TIERS = {
    "anonymous": Tier(
        weight=1,
        max_running=1000,
        max_queued=1000,
        gpu_seconds=1e12,
        window_s=3600,
        address_gpu_seconds=1e12,
        requests_per_minute=10**9,
    ),
    "api key": Tier(weight=1, max_running=1000, max_queued=1000, gpu_seconds=1e12, window_s=3600),
}
JOB_CLIENTS = {
    "anonymous": ClientRef("session:bench", "session", "anonymous", "10.0.0.1"),
    "api key": ClientRef("key:bench", "key", "bench", "10.0.0.1"),
}


def redis_calls(url: str) -> int:
    """Scripts Redis has run so far (INFO commandstats: EVALSHA and EVAL; the commands a
    script runs are counted apart), to count a job's round trips."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


class _Deferred:
    """Stands in for GlobalLimits' settler thread while a job's calls are counted: its
    off-path work (the shared fairness counters) runs afterwards, counted apart."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.tasks.append((fn, args, kwargs))

    def run(self) -> None:
        for fn, args, kwargs in self.tasks:
            fn(*args, **kwargs)
        self.tasks.clear()

    def shutdown(self, wait: bool = True) -> None:
        self.run()


def fresh_nonce() -> tuple[str, float]:
    """A fresh identity-token nonce and its ttl, as a GPU tier passes them at admission."""
    return secrets.token_urlsafe(12), 120.0


def job_store_work(url: str, seconds: float) -> dict[str, dict[str, float]]:
    """Per kind of caller: ms of store work in admission (event loop), dispatch (the move)
    and finish (GPU thread), and Redis round trips per phase, on the job's path and off it
    (the settler thread's fairness counters)."""
    from splitspace.gpu_backend.admission.scheduler import Job
    from splitspace.gpu_backend.stores.global_limits import GlobalLimits
    from splitspace.gpu_backend.stores.resilient_store import open_store

    out: dict[str, dict[str, float]] = {}
    for kind, tier in JOB_TIERS.items():
        client = JOB_CLIENTS[kind]
        store = open_store(redis_url=url, sqlite_path=Path("unused"))
        assert isinstance(store, ResilientStore)

        # (run in this iteration; the loop's values are passed, not closed over)
        async def measure(store: ResilientStore, tier: Tier, client: ClientRef) -> dict[str, float]:
            gl = GlobalLimits(store=store, limits=lambda c: tier)
            ms = {"admit": 0.0, "start": 0.0, "finish": 0.0}
            jobs = 0

            async def one() -> list[float]:
                job_id = uuid.uuid4().hex
                t0 = time.perf_counter()
                await gl.admit(client, job_id, 0.5, *fresh_nonce())
                t1 = time.perf_counter()
                job = Job(job_id, client, 0.5, None, time.time())
                assert gl.start([job])[0]
                t2 = time.perf_counter()
                gl.finish(job, 0.4)  # measured less than estimated: a correction to settle
                return [t1 - t0, t2 - t1, time.perf_counter() - t2]

            try:
                for _ in range(30):
                    await one()
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    for phase, took in zip(ms, await one(), strict=True):
                        ms[phase] += took
                    jobs += 1
                settler, deferred = gl._settler, _Deferred()
                gl._settler = deferred  # type: ignore[assignment]
                calls = [redis_calls(url)]
                job_id = uuid.uuid4().hex
                await gl.admit(client, job_id, 0.5, *fresh_nonce())
                calls.append(redis_calls(url))
                job = Job(job_id, client, 0.5, None, time.time())
                gl.start([job])
                calls.append(redis_calls(url))
                gl.finish(job, 0.4)
                calls.append(redis_calls(url))
                deferred.run()
                calls.append(redis_calls(url))
                gl._settler = settler
            finally:
                gl.close()
                await store.aclose()
            trips = {f"{phase}_calls": calls[i + 1] - calls[i] for i, phase in enumerate(ms)}
            return {k: v / jobs * 1000 for k, v in ms.items()} | trips | {"off_path_calls": calls[4] - calls[3]}

        out[kind] = asyncio.run(measure(store, tier, client))
        store.close()
    return out


def part1(seconds: float, redis_url: str | None) -> None:
    local: LocalRedis | None = None
    url = redis_url
    if url is None:
        local = LocalRedis().start()
        url = local.url
    prefix = f"bench:{uuid.uuid4().hex}:"
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        stores: list[tuple[str, Any]] = [
            ("memory", MemoryUsageStore()),
            ("redis", RedisStore.from_url(url, prefix=prefix + "a:")),
        ]
        for name, store in stores:
            rows.append((name, {op: rate_of(fn, seconds) for op, fn in sync_ops(store).items()}))
            store.close()

        async def run_async() -> dict[str, float]:
            store = RedisStore.from_url(url, prefix=prefix + "c:")
            try:
                return {op: await async_rate_of(fn, seconds) for op, fn in async_ops(store).items()}
            finally:
                await store.aclose()
                store.close()

        rows.append(("redis (asyncio)", asyncio.run(run_async())))
        jobs = job_store_work(url, seconds)
    finally:
        if local is not None:
            local.stop()

    print(f"== part 1: a job's store steps per second, one caller, loopback Redis ({seconds:g} s each) ==\n")
    print("| store | " + " | ".join(OPS) + " |")
    print("|---|" + "---:|" * len(OPS))
    for name, figures in rows:
        print(f"| {name} | " + " | ".join(f"{figures[op]:,.0f}" if op in figures else "-" for op in OPS) + " |")
    print("\nEach cell is one store call as a GPU tier makes it; latency = 1 / rate.")
    print(
        "\nOne job's store work on Redis as a GPU tier does it (GlobalLimits over the failover wrappers): "
        "ms per job, and Redis round trips (scripts) of each step:\n"
    )
    print(
        "| caller | admission (event loop) | dispatch (GPU thread) | finish (GPU thread) | total on the path "
        "| round trips on the path | off the path (settler) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, f in jobs.items():
        total = f["admit"] + f["start"] + f["finish"]
        path = f"{f['admit_calls']:.0f} + {f['start_calls']:.0f} + {f['finish_calls']:.0f}"
        print(
            f"| {kind} | {f['admit']:.2f} ms | {f['start']:.2f} ms | {f['finish']:.2f} ms | {total:.2f} ms "
            f"| {path} | {f['off_path_calls']:.0f} |"
        )


# -- deployments for parts 2 and 3 -------------------------------------------------------
class Tiers:
    """One frontend in front of ``n`` GPU tiers (each its own process), on one Redis or none."""

    def __init__(
        self,
        workdir: Path,
        *,
        n: int,
        model: str,
        quotas: str,
        redis_url: str | None,
        frontend_env: dict[str, str] | None = None,
    ) -> None:
        self.d = Deployment(workdir, model=model, quotas=quotas)
        workdir.mkdir(parents=True, exist_ok=True)
        self.d.write_quotas(quotas)
        self.backends: list[TierProcess] = []
        self.frontend: TierProcess | None = None
        try:
            for i in range(n):
                env = {
                    **self.d.common_env(),
                    "SPLITSPACE_MODEL": model,
                    "SPLITSPACE_ADMIN_TOKEN": self.d.admin_token,
                    "SPLITSPACE_STATE_PATH": str(workdir / f"gpu{i}.sqlite3"),
                }
                if redis_url is not None:
                    env |= {"SPLITSPACE_REDIS_URL": redis_url, "SPLITSPACE_REPLICAS": str(n)}
                self.backends.append(start_tier("backend", free_port(), env, workdir / f"gpu{i}.log"))
            env = {
                **self.d.common_env(),
                "SPLITSPACE_BACKEND_URL": ",".join(b.url for b in self.backends),
                **(frontend_env or {}),
            }
            self.frontend = start_tier("frontend", free_port(), env, workdir / "frontend.log")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        assert self.frontend is not None
        return self.frontend.url

    def stop(self) -> None:
        for tier in ([self.frontend] if self.frontend else []) + self.backends:
            tier.stop()


def redis_db(local: LocalRedis, db: int) -> str:
    """A database of its own per deployment, so that shared counters never cross."""
    return f"redis://{local.host}:{local.port}/{db}"


# -- part 2: noisy neighbour on 1 and 2 GPU tiers ------------------------------------------
HEAVY_MAX_RUNNING = 4
NN_QUOTAS_TIERS = (
    f"\n[tiers.heavy]\nweight = 1\nmax_running = {HEAVY_MAX_RUNNING}\nmax_queued = 100\n"
    "gpu_seconds = 100000\nwindow_s = 3600\n"
    "\n[tiers.light]\nweight = 1\nmax_running = 1\nmax_queued = 100\ngpu_seconds = 100000\nwindow_s = 3600\n"
)


NN_ONE, NN_TWO, NN_SQLITE = "1 tier", "2 tiers", "1 tier, SQLite"


def part2(rounds: int, warmup: int, work: Path, with_sqlite: bool) -> bool:
    """The noisy neighbour on each configuration, rounds interleaved; PASS/FAIL per goal."""
    from fairness import BURST, JOB_MS, LIGHTS, noisy_neighbour

    keys = {"heavy": ("key-heavy", "heavy")} | {f"light{i}": (f"key-light{i}", "light") for i in range(LIGHTS)}
    quotas = bench_quotas(keys, NN_QUOTAS_TIERS)
    local = LocalRedis(workdir=work / "redis-nn").start()
    configs: dict[str, tuple[int, str | None]] = {NN_ONE: (1, redis_db(local, 1)), NN_TWO: (2, redis_db(local, 2))}
    if with_sqlite:
        configs[NN_SQLITE] = (1, None)
    deployments: dict[str, Tiers] = {}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    try:
        for i, (name, (n, url)) in enumerate(configs.items()):
            deployments[name] = Tiers(work / f"nn-{i}", n=n, model=f"sleep:{JOB_MS}", quotas=quotas, redis_url=url)
        for r in range(warmup + rounds):  # interleaved, so that the machine's drift hits all alike
            for name, d in deployments.items():
                res = noisy_neighbour("splitspace", d.url)
                if r >= warmup:
                    results[name].append(res)
                    print(
                        f"  round {r - warmup + 1}, {name}: heavy total {res['heavy_total_s']:.2f} s, lights p50 "
                        f"{res['light_p50_s']:.3f} s, worst {res['light_max_s']:.3f} s, errors "
                        f"{res['errors']:.0f}",
                        flush=True,
                    )
                time.sleep(1.0)
    finally:
        for d in deployments.values():
            d.stop()
        local.stop()
    job = JOB_MS / 1000
    print(
        f"\n== part 2: noisy neighbour, {BURST}-job burst (max_running = {HEAVY_MAX_RUNNING}) + {LIGHTS} lights "
        f"0.2 s later, sleep:{JOB_MS}, one frontend, Redis on (but in '{NN_SQLITE}'), median of {rounds} rounds =="
    )
    print(f"{'GPU tiers':<16}{'heavy total':>13}{'light p50':>22}{'light worst':>22}{'errors':>8}")
    summary: dict[str, tuple[float, float, float]] = {}
    for name, rs in results.items():
        total = median([x["heavy_total_s"] for x in rs])
        p50 = median([x["light_p50_s"] for x in rs])
        worst = median([x["light_max_s"] for x in rs])
        errors = sum(int(x["errors"]) for x in rs)
        summary[name] = (total, p50, worst)
        print(
            f"{name:<16}{total:>11.2f} s{p50:>11.3f} s ({p50 / job:4.1f} jobs)"
            f"{worst:>11.3f} s ({worst / job:4.1f} jobs)"
            f"{errors:>8}"
        )
    ratio = summary[NN_TWO][0] / summary[NN_ONE][0]
    verdicts = [ratio <= 0.575]
    print(f"heavy total 2 tiers / 1 tier: {ratio:.3f} (goal <= 0.575, half within 15 %): {_pass(verdicts[-1])}")
    for name, (_, p50, worst) in summary.items():
        for what, value in (("p50", p50), ("worst", worst)):
            met = value <= 4 * job
            if name == NN_TWO:
                verdicts.append(met)
                print(f"{name}: lights' {what} {value / job:.1f} job times (goal <= 4): {_pass(met)}")
            else:  # one tier: what two tiers are compared with (bench/fairness.py has its goals)
                print(f"{name}: lights' {what} {value / job:.1f} job times (<= 4: {'yes' if met else 'no'}; reference)")
    return all(verdicts)


def _pass(met: bool) -> str:
    return "PASS" if met else "FAIL"


# -- part 3: the hop's added latency with Redis on -----------------------------------------
GEN = ["scaleout", "", 64, 64, 1, 0.0, 1]
HOP_QUOTAS = bench_quotas(
    {"hop": ("key-hop", "bulk")},
    "\n[tiers.bulk]\nweight = 1\nmax_running = 1\nmax_queued = 100000\ngpu_seconds = 1e9\nwindow_s = 3600\n"
    "\n[tiers.anonymous]\nmax_queued = 100000\ngpu_seconds = 1e9\naddress_gpu_seconds = 1e9\n"
    "requests_per_minute = 1000000\n",
)
CALLERS = {"anonymous": {}, "api key": {"authorization": "Bearer key-hop"}}
SQLITE, REDIS = "sqlite (default)", "redis"


async def alternating(urls: dict[str, str], headers: dict[str, str], n: int) -> dict[str, list[float]]:
    """``n`` single calls to each system, one at a time and alternating between them (A, B,
    A, B, ...: the machine's drift hits both alike), after 10 unmeasured ones each; the
    seconds of each call, per system."""
    clients = {name: httpx.AsyncClient(timeout=60) for name in urls}
    try:
        for name, url in urls.items():
            for _ in range(10):
                await rest_call(clients[name], url, "generate", GEN, headers)
        times: dict[str, list[float]] = {name: [] for name in urls}
        for i in range(n):
            order = list(urls) if i % 2 == 0 else list(reversed(urls))
            for name in order:
                t0 = time.perf_counter()
                ok, payload = await rest_call(clients[name], urls[name], "generate", GEN, headers)
                times[name].append(time.perf_counter() - t0)
                if not ok:
                    raise SystemExit(f"a call to {name} failed: {payload}")
        return times
    finally:
        for c in clients.values():
            await c.aclose()


def part3(rounds: int, seq: int, model: str, work: Path) -> bool:
    local = LocalRedis(workdir=work / "redis-hop").start()
    systems: dict[str, Tiers] = {}
    times: dict[str, list[dict[str, list[float]]]] = {caller: [] for caller in CALLERS}
    try:
        systems[SQLITE] = Tiers(work / "hop-sqlite", n=1, model=model, quotas=HOP_QUOTAS, redis_url=None)
        systems[REDIS] = Tiers(work / "hop-redis", n=1, model=model, quotas=HOP_QUOTAS, redis_url=redis_db(local, 3))
        urls = {name: d.url for name, d in systems.items()}
        for r in range(rounds):
            for caller, headers in CALLERS.items():
                t = asyncio.run(alternating(urls, headers, seq))
                times[caller].append(t)
                print(
                    f"  round {r + 1}, {caller}: p50 sqlite {median(t[SQLITE]) * 1000:.1f} ms, "
                    f"redis {median(t[REDIS]) * 1000:.1f} ms",
                    flush=True,
                )
    finally:
        for d in systems.values():
            d.stop()
        local.stop()
    print(
        f"\n== part 3: single calls one at a time, frontend -> one GPU tier, {model}, SQLite and Redis "
        f"alternating, {rounds} rounds of {seq} calls each =="
    )
    print(f"{'caller':<11}{'store':<18}{'p50 ms':>8}{'p90 ms':>8}  per round p50")
    ok = True
    for caller in CALLERS:
        rs = times[caller]
        p50s: dict[str, float] = {}
        for name in systems:
            every = [x for r in rs for x in r[name]]
            p50s[name] = median(every) * 1000
            each = ", ".join(f"{median(r[name]) * 1000:.1f}" for r in rs)
            print(f"{caller:<11}{name:<18}{p50s[name]:>8.1f}{pct(every, 90) * 1000:>8.1f}  {each}")
        diff = p50s[REDIS] - p50s[SQLITE]
        paired = median([b - a for r in rs for a, b in zip(r[SQLITE], r[REDIS], strict=True)]) * 1000
        verdict = diff <= 2.0
        ok &= verdict
        print(
            f"{caller:<11}redis - sqlite: p50 {diff:+.2f} ms, median of paired differences {paired:+.2f} ms "
            f"(goal <= 2 ms at p50): {_pass(verdict)}"
        )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--part", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3], help="which parts to run (default: all)"
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="part 1: time per operation and store")
    parser.add_argument("--redis-url", default=None, help="part 1: an existing Redis (default: start one)")
    parser.add_argument("--rounds", type=int, default=3, help="parts 2 and 3: measured rounds, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="part 2: unmeasured rounds first")
    parser.add_argument(
        "--with-sqlite",
        action="store_true",
        help="part 2: also one GPU tier without Redis (the SQLite default), for reference",
    )
    parser.add_argument("--seq", type=int, default=200, help="part 3: calls per round")
    parser.add_argument("--hop-model", default="sleep:0", help="part 3: the model (sleep:0, sleep:20, tiny)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="splitspace-scaleout-"))
    ok = True
    if 1 in args.part:
        part1(args.seconds, args.redis_url)
    if 2 in args.part:
        ok &= part2(args.rounds, args.warmup, work, args.with_sqlite)
    if 3 in args.part:
        ok &= part3(args.rounds, args.seq, args.hop_model, work)
    if 2 in args.part or 3 in args.part:
        print(f"\n{'every goal met' if ok else 'a goal was missed'} (logs in {work})")


if __name__ == "__main__":
    main()
