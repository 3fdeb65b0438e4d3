"""Memory of the tiers after many distinct clients and many idle pages.

Why: what a tier keeps per client must be bounded by what is active, or a crowd of
distinct clients (IPv6 /64s are cheap) grows it for good. Three measurements:

1. **In process, 100,000 distinct clients** through the per-client structures of both
   tiers, each client once (the frontend's ``InflightCaps`` learns its cap, its
   ``FairDoor`` lets it in and out; the GPU tier's ``FairScheduler`` queues, runs and
   finishes one job, in virtual time 10 ms apart; its usage store counts it). Printed:
   the entries each structure still holds and the process's RSS growth.
2. **Through the real frontend, a few thousand distinct clients** (distinct addresses
   in ``X-Forwarded-For``, one REST ``/generate`` each, ``sleep:1`` model). Printed: the
   RSS of both tiers before and after.
3. **Idle heartbeat streams**: 4 rounds of 2,000 ``GET /gradio_api/heartbeat/<id>``
   streams (from distinct addresses) opened, held, then closed. Printed: the
   frontend's RSS once each round's streams are open and once they are gone (its
   ``/health`` counting no page and no session), which must not keep growing.

Run: python bench/memory.py [--clients 100000] [--rest 2000] [--streams 2000] [--rounds 4]
(the open streams need ``ulimit -n`` above twice ``--streams``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import secrets
import signal
import sys
import time
from pathlib import Path

import httpx

from splitspace.deploy.processes import Deployment


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def address(i: int) -> str:
    """The i-th distinct client address: an IPv6 /64 each (one flow each at both tiers)."""
    return f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1"


# -- 1. in process ---------------------------------------------------------------------------
def in_process(n: int) -> None:
    from splitspace.cpu_frontend.door.door import FairDoor
    from splitspace.cpu_frontend.door.limits import InflightCaps
    from splitspace.gpu_backend.admission.scheduler import ClientRef, FairScheduler
    from splitspace.gpu_backend.stores.usage import MemoryUsageStore
    from splitspace.session.identity import Identity
    from splitspace.shared.contract.quotas import QuotaConfig, Tier

    async def frontend() -> tuple[InflightCaps, FairDoor]:
        caps, door = InflightCaps(QuotaConfig), FairDoor()
        for i in range(n):
            ident = Identity(f"addr:{address(i)}", "address", "anonymous", address(i))
            caps.learn(ident, 10)
            door.join(ident.flow_id, 10).leave()
        return caps, door

    gc.collect()
    before = rss_mb()
    caps, door = asyncio.run(frontend())
    gc.collect()
    print(
        f"frontend, {n:,} distinct clients: InflightCaps holds {len(caps._learned):,}, "
        f"FairDoor {len(door._flows):,} flows; RSS +{rss_mb() - before:.1f} MB"
    )

    now = [0.0]
    store = MemoryUsageStore(clock=lambda: now[0])
    tier = Tier(weight=1, max_running=1, max_queued=8, gpu_seconds=600, window_s=3600)
    sched = FairScheduler(clock=lambda: now[0], limits=lambda c: tier, store=store)
    gc.collect()
    before = rss_mb()
    for i in range(n):
        now[0] = i * 0.01
        ref = ClientRef(f"addr:{address(i)}", "address", "anonymous", address(i))
        assert sched.submit(f"j{i}", ref, 0.005).ok
        for job in sched.dispatch():
            sched.finish(job.job_id, 0.005)
    gc.collect()
    flows = len(sched._flows)
    print(
        f"GPU tier, {n:,} distinct clients over {now[0]:,.0f} s: FairScheduler holds {flows:,} flows, "
        f"{len(sched._seen):,} clients seen; usage store {len(store._windows):,} windows (live: all); "
        f"RSS +{rss_mb() - before:.1f} MB"
    )
    now[0] += 3600 + 600
    forget = getattr(sched, "forget_idle", None)
    expire = getattr(store, "forget_expired", None)
    if forget is not None and expire is not None:
        expire()
        forget()
        gc.collect()
        print(
            f"  an hour and 10 min later (windows ended, all idle): {len(sched._flows):,} flows, "
            f"{len(sched._seen):,} clients seen, {len(store._windows):,} windows; "
            f"RSS +{rss_mb() - before:.1f} MB (freed memory stays with the process)"
        )


# -- 2. through the real frontend -------------------------------------------------------------
def rest_clients(d: Deployment, n: int) -> None:
    assert d.frontend is not None and d.backend is not None
    before = rss_mb(d.frontend.proc.pid), rss_mb(d.backend.proc.pid)
    data = {"data": ["a red fox", "", 64, 64, 1, 1.0, 1]}

    async def one(client: httpx.AsyncClient, i: int, gate: asyncio.Semaphore) -> bool:
        async with gate:
            headers = {"x-forwarded-for": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}
            r = await client.post(f"{d.frontend.url}/gradio_api/call/generate", json=data, headers=headers)
            if r.status_code != 200:
                return False
            async with client.stream(
                "GET", f"{d.frontend.url}/gradio_api/call/generate/{r.json()['event_id']}", headers=headers
            ) as s:
                async for line in s.aiter_lines():
                    if line.startswith("event: complete"):
                        return True
                    if line.startswith("event: error"):
                        return False
            return False

    async def all_of() -> int:
        gate = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return sum(await asyncio.gather(*(one(client, i, gate) for i in range(n))))

    started = time.monotonic()
    ok = asyncio.run(all_of())
    after = rss_mb(d.frontend.proc.pid), rss_mb(d.backend.proc.pid)
    print(
        f"real tiers, {n:,} distinct addresses, one /generate each ({ok:,} complete, "
        f"{time.monotonic() - started:.0f} s): frontend RSS {before[0]:.0f} -> {after[0]:.0f} MB, "
        f"GPU tier {before[1]:.0f} -> {after[1]:.0f} MB"
    )


# -- 3. idle heartbeat streams ----------------------------------------------------------------
async def heartbeat_round(port: int, n: int, first: int) -> tuple[int, list]:  # type: ignore[type-arg]
    """Open ``n`` heartbeat streams from distinct addresses; how many were let in."""
    conns = []
    for i in range(first, first + n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /gradio_api/heartbeat/{secrets.token_hex(8)} HTTP/1.1\r\nHost: bench\r\n"
            f"X-Forwarded-For: 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\r\n\r\n".encode()
        )
        conns.append((reader, writer))
    opened = 0
    for reader, _ in conns:
        head = await asyncio.wait_for(reader.read(100), 60)
        opened += head.startswith(b"HTTP/1.1 200")
    return opened, conns


def heartbeats(d: Deployment, n: int, rounds: int) -> None:
    assert d.frontend is not None
    pid, port = d.frontend.proc.pid, int(d.frontend.url.rsplit(":", 1)[1])
    print(f"idle heartbeat streams, {rounds} rounds of {n:,}: frontend RSS at start {rss_mb(pid):.0f} MB")

    async def go() -> None:
        for r in range(rounds):
            opened, conns = await heartbeat_round(port, n, r * n)
            open_rss = rss_mb(pid)
            for _, writer in conns:
                writer.close()
            await asyncio.gather(*(writer.wait_closed() for _, writer in conns), return_exceptions=True)
            pages = await asyncio.to_thread(wait_pages_gone, d.frontend.url)
            print(
                f"  round {r + 1}: {opened:,} open (RSS {open_rss:.0f} MB); all closed: RSS {rss_mb(pid):.0f} MB, "
                f"/health pages {pages}"
            )

    asyncio.run(go())


def wait_pages_gone(url: str, timeout_s: float = 300) -> object:
    """The frontend's /health 'pages' once no page is open and no session state is kept
    (or its last answer); the old frontend has no such count: after a minute."""
    deadline = time.monotonic() + timeout_s
    doc: object = None
    while time.monotonic() < deadline:
        try:
            doc = httpx.get(f"{url}/health", timeout=30).json().get("pages")
        except httpx.HTTPError:
            continue
        if doc is None:  # the old frontend: give its unload calls a minute
            time.sleep(60)
            return doc
        if doc == {"open": 0, "sessions": 0}:
            return doc
        time.sleep(0.5)
    return doc


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the tiers on the way out
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--rest", type=int, default=2_000)
    parser.add_argument("--streams", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.streams + 1024)), hard))
    in_process(args.clients)
    workdir = Path(f"/tmp/splitspace-bench-memory-{secrets.token_hex(4)}")
    d = Deployment(
        workdir, model="sleep:1", trusted_proxies=1, frontend_env={"SPLITSPACE_HEARTBEATS_TOTAL": str(args.streams)}
    )
    d.start()
    try:
        if args.rest:
            rest_clients(d, args.rest)
        if args.streams:
            heartbeats(d, args.streams, args.rounds)
    finally:
        d.stop()


if __name__ == "__main__":
    main()
