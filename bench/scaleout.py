"""Scale-out benchmark, part 1: admission operations per second of each usage store.

What one admission costs on each store the tiers can use: the memory store (tests), the
SQLite default, and Redis (blocking client, the same behind the failover wrapper the
tiers use, and the asyncio client). Each operation is one caller's round trip, run back
to back for ``--seconds`` on one thread (one event loop for the async store), so the
figure is the inverse of its latency; a GPU tier does a handful per request.

    python bench/scaleout.py [--seconds 1.0] [--redis-url URL]

Without ``--redis-url`` a throwaway ``redis-server`` is started on a free port (loopback).
Operations: ``reserve+adjust`` (a GPU-second reservation and its settlement),
``acquire+release`` (a slot lease taken and given back), ``move`` (a queued lease
dispatched to running and the running one released: acquire, move, release), and
``admit_rate`` (a sliding-window admission with a fresh job id, over 1000 clients with
``requests_per_minute = 100``: admissions, then refusals once a window is full).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deploy.redis_local import LocalRedis  # noqa: E402
from gpu_backend.redis_store import AsyncRedisStore, RedisStore  # noqa: E402
from gpu_backend.resilient_store import ResilientStore  # noqa: E402
from gpu_backend.usage import MemoryUsageStore, SqliteUsageStore  # noqa: E402

OPS = ("reserve+adjust", "acquire+release", "move", "admit_rate")
CLIENTS, RPM = 1000, 100
"""admit_rate spreads over this many clients with requests_per_minute = RPM: windows hold at
most RPM entries, and once a client's is full its admissions are refusals, as in service."""


def sync_ops(store: Any) -> dict[str, Callable[[int], None]]:
    def reserve(i: int) -> None:
        store.reserve("key:bench", 0.5, float("inf"), 3600.0)
        store.adjust("key:bench", -0.1)

    def slot(i: int) -> None:
        store.acquire_slot("running", "key:bench", f"j{i}", 1000, 30.0)
        store.release("running", "key:bench", f"j{i}")

    def move(i: int) -> None:
        store.acquire_slot("queued", "key:bench", f"m{i}", 1000, 30.0)
        store.move("key:bench", f"m{i}", 1000, 30.0)
        store.release("running", "key:bench", f"m{i}")

    def rate(i: int) -> None:
        store.admit_rate(f"key:c{i % CLIENTS}", f"r{i}", RPM, 60.0)

    return dict(zip(OPS, (reserve, slot, move, rate)))


def async_ops(store: AsyncRedisStore) -> dict[str, Callable[[int], Awaitable[None]]]:
    async def reserve(i: int) -> None:
        await store.reserve("key:bench", 0.5, float("inf"), 3600.0)
        await store.adjust("key:bench", -0.1)

    async def slot(i: int) -> None:
        await store.acquire_slot("running", "key:bench", f"j{i}", 1000, 30.0)
        await store.release("running", "key:bench", f"j{i}")

    async def move(i: int) -> None:
        await store.acquire_slot("queued", "key:bench", f"m{i}", 1000, 30.0)
        await store.move("key:bench", f"m{i}", 1000, 30.0)
        await store.release("running", "key:bench", f"m{i}")

    async def rate(i: int) -> None:
        await store.admit_rate(f"key:c{i % CLIENTS}", f"r{i}", RPM, 60.0)

    return dict(zip(OPS, (reserve, slot, move, rate)))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per operation and store")
    parser.add_argument("--redis-url", default=None, help="an existing Redis (default: start one)")
    args = parser.parse_args()

    local: LocalRedis | None = None
    url = args.redis_url
    if url is None:
        local = LocalRedis().start()
        url = local.url
    prefix = f"bench:{uuid.uuid4().hex}:"
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stores: list[tuple[str, Any]] = [
                ("memory", MemoryUsageStore()),
                ("sqlite (default)", SqliteUsageStore(Path(tmp) / "state.sqlite3")),
                ("redis", RedisStore.from_url(url, prefix=prefix + "a:")),
                ("redis, failover wrapper", ResilientStore(RedisStore.from_url(url, prefix=prefix + "b:"), mode="local", replicas=2)),
            ]
            for name, store in stores:
                rows.append((name, {op: rate_of(fn, args.seconds) for op, fn in sync_ops(store).items()}))
                store.close()

            async def run_async() -> dict[str, float]:
                store = AsyncRedisStore.from_url(url, prefix=prefix + "c:")
                try:
                    return {op: await async_rate_of(fn, args.seconds) for op, fn in async_ops(store).items()}
                finally:
                    await store.close()

            rows.append(("redis (asyncio)", asyncio.run(run_async())))
    finally:
        if local is not None:
            local.stop()

    print(f"Admission operations per second, one caller, loopback Redis ({args.seconds:g} s each)\n")
    print("| store | " + " | ".join(OPS) + " |")
    print("|---|" + "---:|" * len(OPS))
    for name, figures in rows:
        print(f"| {name} | " + " | ".join(f"{figures[op]:,.0f}" for op in OPS) + " |")
    print("\nEach cell is one operation as a GPU tier does it (reserve+adjust is two store calls, "
          "acquire+release two, move three, admit_rate one); latency = 1 / rate.")


if __name__ == "__main__":
    main()
