"""What checking the identity token's nonce in Redis adds to a GPU tier's admission.

With ``SPLITSPACE_REDIS_URL`` the admission's one script (``GlobalLimits.admit``) also
sets the call's nonce (``SET NX PX``), so a captured call is refused on every GPU tier.
This times that admission on a loopback ``redis-server``, with and without a nonce,
alternating (A, B, B, A, ...) so that the machine's drift hits both alike, and counts the
scripts and commands each admission runs (``INFO commandstats``): the nonce adds a
command inside the script, not a round trip.

    python bench/nonce.py [--n 2000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splitspace.deploy.redis_local import LocalRedis  # noqa: E402
from splitspace.gpu_backend.admission.scheduler import ClientRef  # noqa: E402
from splitspace.gpu_backend.stores.global_limits import GlobalLimits  # noqa: E402
from splitspace.gpu_backend.stores.resilient_store import ResilientStore, open_store  # noqa: E402
from splitspace.shared.contract.quotas import Tier  # noqa: E402

TIER = Tier(weight=1, max_running=10**6, max_queued=10**6, gpu_seconds=1e12, window_s=3600)


def commands(url: str) -> tuple[int, int]:
    """(scripts run, commands run, those inside scripts included) so far."""
    import redis

    stats = redis.Redis.from_url(url).info("commandstats")
    scripts = sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    return scripts, sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def measure(url: str, n: int) -> dict[str, list[float]]:
    store = open_store(redis_url=url, sqlite_path=Path("unused"))
    assert isinstance(store, ResilientStore)
    gate = GlobalLimits(store=store, limits=lambda c: TIER)
    client = ClientRef("key:bench", "key", "bench", "127.0.0.1")
    times: dict[str, list[float]] = {"without nonce": [], "with nonce": []}

    async def one(kind: str) -> float:
        nonce = secrets.token_urlsafe(12) if kind == "with nonce" else ""
        t0 = time.perf_counter()
        await gate.admit(client, uuid.uuid4().hex, 0.5, nonce, 120.0)
        return time.perf_counter() - t0

    try:
        for _ in range(200):  # warm up: connections, scripts, the clock
            await one("with nonce")
        for i in range(n):
            order = list(times) if i % 2 == 0 else list(reversed(times))
            for kind in order:
                times[kind].append(await one(kind))
        for kind in times:
            before = commands(url)
            await one(kind)
            after = commands(url)
            print(
                f"{kind}: {after[0] - before[0]} round trip(s) (scripts), {after[1] - before[1]} Redis commands"
                " per admission"
            )
    finally:
        gate.close()
        await store.aclose()
        store.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--redis-url")
    args = ap.parse_args()
    local = None if args.redis_url else LocalRedis().start()
    try:
        times = asyncio.run(measure(args.redis_url or local.url, args.n))  # type: ignore[union-attr]
    finally:
        if local is not None:
            local.stop()
    for kind, ts in times.items():
        ts.sort()
        print(
            f"{kind}: p50 {statistics.median(ts) * 1000:.3f} ms, p95 {ts[int(len(ts) * 0.95)] * 1000:.3f} ms"
            f" ({len(ts)} admissions)"
        )
    added = statistics.median(times["with nonce"]) - statistics.median(times["without nonce"])
    print(f"added by the nonce at p50: {added * 1e6:+.0f} us per call")


if __name__ == "__main__":
    main()
