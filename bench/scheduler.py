"""Per-decision cost of the fair scheduler core at 100, 1,000 and 10,000 active clients.

Why: every admitted request pays one submit, one dispatch, one finish and a position
query per status update, under the runner's lock, so a cost that grows with the number
of waiting clients turns a crowd into a stall. This measures each operation alone, in
the core with a fake clock and the in-memory usage store (no tiers, no I/O).

Setup per size N: N API-key clients with weights 1, 2 and 3 and two queued jobs each
(costs 0.5-1.5 s), one GPU slot. Then, in steady state (each job that leaves is replaced
by a new one from the same client, untimed, so N clients stay active):

- dispatch: start the next job (``--max-batch`` > 1: a batch of jobs with the same one of
  four batch keys, through the batch index); finish: settle each job with a measured
  time 0.8-1.2x its estimate (so every finish corrects the flow's service);
- submit: a new job from the client whose job left;
- cancel: drop a random queued job;
- position: a random waiter's place and ETA, right after a change.

Printed: microseconds per call (mean and median, the best of ``--repeat`` runs, as
timeit does, since other processes on a shared machine only ever add time), and the
growth ratio 10,000 / 100. Calls are timed in the thread's CPU time by default, so that
time the process spends descheduled on a loaded machine is not counted (``--clock
wall`` for wall-clock time). Run: python bench/scheduler.py [--ops 3000] [--repeat 3] [--max-batch 4]
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splitspace.gpu_backend.admission.scheduler import ClientRef, FairScheduler  # noqa: E402
from splitspace.gpu_backend.stores.usage import MemoryUsageStore  # noqa: E402
from splitspace.shared.contract.quotas import Tier  # noqa: E402

OPS = ("submit", "dispatch", "finish", "cancel", "position")
_now = time.thread_time_ns  # the thread's CPU time: what other processes take is not counted
_OVERHEAD_NS = 0.0  # one timer pair, subtracted from every sample


def use_clock(name: str) -> None:
    """Time calls in the thread's CPU time ("cpu") or in wall-clock time ("wall")."""
    global _now, _OVERHEAD_NS
    _now = time.thread_time_ns if name == "cpu" else time.perf_counter_ns
    pairs = []
    for _ in range(20_000):
        t0 = _now()
        pairs.append(_now() - t0)
    _OVERHEAD_NS = statistics.median(pairs)


SHAPES = ("512x512", "768x768", "512x768", "1024x1024")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def measure(n: int, ops: int, seed: int = 1, max_batch: int = 1) -> dict[str, list[float]]:
    """Microseconds per call of each operation at ``n`` active clients; with
    ``max_batch > 1`` jobs have one of four batch keys and dispatch fills batches."""
    rng = random.Random(seed)
    tiers = {w: Tier(weight=w, max_running=1, max_queued=100, gpu_seconds=math.inf) for w in (1, 2, 3)}
    clients = [ClientRef(f"key:c{i}", "key", "free", "10.0.0.1") for i in range(n)]
    weight = {c: float(1 + i % 3) for i, c in enumerate(clients)}
    clock = FakeClock()
    sched = FairScheduler(clock=clock, limits=lambda c: tiers[weight[c]], store=MemoryUsageStore())
    queued: list[str] = []  # job ids, for picking random waiters
    where: dict[str, int] = {}
    owner: dict[str, ClientRef] = {}
    ids = iter(range(10**9))
    times: dict[str, list[float]] = {op: [] for op in OPS}

    def add(client: ClientRef, timed: bool) -> None:
        job_id = f"j{next(ids)}"
        t0 = _now()
        shape = rng.choice(SHAPES) if max_batch > 1 else None
        admission = sched.submit(job_id, client, rng.uniform(0.5, 1.5), shape)
        if timed:
            times["submit"].append(max(0.0, _now() - t0 - _OVERHEAD_NS) / 1e3)
        assert admission.ok, admission
        where[job_id] = len(queued)
        queued.append(job_id)
        owner[job_id] = client

    def remove(job_id: str) -> None:
        i = where.pop(job_id)
        last = queued.pop()
        if last != job_id:
            queued[i] = last
            where[last] = i

    def position() -> None:
        job_id = rng.choice(queued)
        t0 = _now()
        place = sched.position(job_id)
        times["position"].append(max(0.0, _now() - t0 - _OVERHEAD_NS) / 1e3)
        assert place is not None

    for client in clients:
        for _ in range(2):
            add(client, timed=False)
    for _ in range(ops):
        t0 = _now()
        batch = sched.dispatch(max_batch)
        times["dispatch"].append(max(0.0, _now() - t0 - _OVERHEAD_NS) / 1e3)
        for job in batch:
            remove(job.job_id)
            add(job.client, timed=True)
        position()
        gpu_s = max(job.cost for job in batch) * rng.uniform(0.8, 1.2)
        clock.now += gpu_s
        for job in batch:
            t0 = _now()
            sched.finish(job.job_id, gpu_s * job.cost / sum(j.cost for j in batch))
            times["finish"].append(max(0.0, _now() - t0 - _OVERHEAD_NS) / 1e3)
        position()

        victim = rng.choice(queued)
        t0 = _now()
        cancelled = sched.cancel(victim)
        times["cancel"].append(max(0.0, _now() - t0 - _OVERHEAD_NS) / 1e3)
        assert cancelled
        remove(victim)
        add(owner.pop(victim), timed=False)
    assert len(sched) == 2 * n
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=3000, help="timed rounds per size and repeat")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the best is shown, as timeit does")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--max-batch", type=int, default=1, help="> 1: four batch keys, batches filled up to this")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the thread's CPU time per call (default; robust on a shared machine); wall: perf_counter",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    use_clock(args.clock)
    means: dict[int, dict[str, float]] = {}
    medians: dict[int, dict[str, float]] = {}
    for n in sizes:
        t0 = time.perf_counter()
        runs = []
        for r in range(args.repeat):
            gc.collect()
            runs.append(measure(n, args.ops, seed=r + 1, max_batch=args.max_batch))
        means[n] = {op: min(statistics.fmean(run[op]) for run in runs) for op in OPS}
        medians[n] = {op: min(statistics.median(run[op]) for run in runs) for op in OPS}
        print(f"# {n} clients: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    batching = f", batches of up to {args.max_batch} over 4 keys" if args.max_batch > 1 else ""
    print(
        f"us per call ({args.clock} time, timer overhead {_OVERHEAD_NS / 1e3:.2f} us taken off), "
        f"best of {args.repeat} runs of {args.ops} rounds{batching} (mean / median)"
    )
    print(f"{'clients':<10}" + "".join(f"{n:>16,}" for n in sizes) + f"{f'{sizes[-1]}/{sizes[0]}':>16}")
    for op in OPS:
        cells = "".join(f"{means[n][op]:>9.1f} /{medians[n][op]:>5.1f}" for n in sizes)
        ratio = (
            f"{means[sizes[-1]][op] / means[sizes[0]][op]:.2f} /{medians[sizes[-1]][op] / medians[sizes[0]][op]:.2f}"
        )
        print(f"{op:<10}{cells}{ratio:>16}")


if __name__ == "__main__":
    main()
