"""How long the scheduler holds the runner's lock per admission and per finished job, by store.

The scheduler reserves and settles GPU-seconds in the usage store while the
runner's lock is held (the GPU thread waits on that lock when a batch ends).
This prints the time of ``submit`` and of ``dispatch`` + ``finish`` with the
write-behind store the GPU tier uses (``gpu_backend/stores/write_behind.py``),
on this machine's disk, against the memory store alone (no file: the floor).
The first release called SQLite under the lock; that store is gone.
Usage: ``python bench/store_lock.py [--jobs 2000]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splitspace.gpu_backend.admission.scheduler import ClientRef, FairScheduler  # noqa: E402
from splitspace.gpu_backend.stores.usage import MemoryUsageStore  # noqa: E402
from splitspace.gpu_backend.stores.write_behind import SqliteUsageStore, WriteBehindStore  # noqa: E402
from splitspace.shared.contract.quotas import Tier  # noqa: E402

TIER = Tier(weight=1, max_running=1, max_queued=10_000, gpu_seconds=1e9, window_s=3600)


def measure(store, jobs: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    sched = FairScheduler(clock=time.time, limits=lambda ref: TIER, store=store, capacity=1)
    clients = [ClientRef(f"key:c{i}", "key", "free", "127.0.0.1") for i in range(50)]
    submit_us, finish_us = [], []
    for i in range(jobs):
        t0 = time.perf_counter()
        sched.submit(f"j{i}", clients[i % len(clients)], 0.01)
        submit_us.append((time.perf_counter() - t0) * 1e6)
    for _ in range(jobs):
        t0 = time.perf_counter()
        batch = sched.dispatch(1)
        sched.finish(batch[0].job_id, 0.012)
        finish_us.append((time.perf_counter() - t0) * 1e6)
    return submit_us, finish_us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for name, make in (
            ("memory only (no file: the floor)", lambda p: MemoryUsageStore()),
            ("write-behind over sqlite (now)", lambda p: WriteBehindStore(SqliteUsageStore(p))),
        ):
            store = make(Path(d) / f"{len(rows)}.sqlite3")
            sub, fin = measure(store, args.jobs)
            store.close()
            q = lambda xs: (statistics.median(xs), statistics.quantiles(xs, n=100)[98])  # noqa: E731
            rows.append((name, *q(sub), *q(fin)))
    print(f"{'store':34} {'submit p50':>11} {'p99':>9} {'dispatch+finish p50':>20} {'p99':>9}  (us, lock held)")
    for name, s50, s99, f50, f99 in rows:
        print(f"{name:34} {s50:11.1f} {s99:9.1f} {f50:20.1f} {f99:9.1f}")
    print(
        f"ratio (write-behind / memory only): submit {rows[1][1] / rows[0][1]:.2f}x, "
        f"dispatch+finish {rows[1][3] / rows[0][3]:.2f}x"
    )


if __name__ == "__main__":
    main()
