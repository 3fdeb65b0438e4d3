"""Durable jobs (``/v1/jobs``): acceptance rate, the cost of a waiting job, webhook latency.

Real tiers as processes on loopback (the frontend with a probe route added by this
script, which reports its asyncio task count; nothing else differs):

1. ``POST /v1/jobs`` accepted per second: 10,000 jobs from 100 API keys, 64 in flight
   at once (aiohttp client), against a GPU tier whose images take 10 minutes (so every
   job stays queued). Goal: >= 300/s.
2. Those 10,000 queued jobs: the frontend's RSS per job, its asyncio tasks and open
   sockets before and after (a waiting job must hold no task and no connection).
3. Webhooks: 300 jobs of 20 ms images, each announcing ``completed`` to one of 100
   receivers (one of which never answers); the time from a job's end (its
   ``finished_at``) to its receiver getting the message, p50 and p95. Goal: p50 < 200 ms.

Run: python bench/jobs.py   (prints the figures; about two minutes)
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from splitspace.deploy.processes import wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Deployment, TierProcess, free_port, sha256  # noqa: E402

KEYS = 100
JOBS = 10_000
IN_FLIGHT = 64
SECRET = "whsec_" + base64.b64encode(b"splitspace-bench-webhook-secret!").decode()
BODY = {"endpoint": "/generate", "inputs": {"prompt": "a red fox", "width": 64, "height": 64, "steps": 1}}


def quotas() -> str:
    text = "[tiers.batch]\nweight = 1\nmax_running = 1\nmax_queued = 400\ngpu_seconds = 1e9\nwindow_s = 3600\n"
    for i in range(KEYS):
        text += (
            f'\n[[keys]]\nname = "k{i:03d}"\ntier = "batch"\nsha256 = "{sha256(f"bench-key-{i:03d}")}"\n'
            f'webhook_secret = "{SECRET}"\n'
        )
    return text


def key(i: int) -> dict[str, str]:
    return {"Authorization": f"Bearer bench-key-{i % KEYS:03d}"}


# -- the frontend, with a probe ------------------------------------------------------------------
def serve_frontend(port: int) -> None:
    """(In the frontend's process.) The frontend app, and ``GET /__bench`` answering its task count."""
    import uvicorn

    from splitspace.cpu_frontend.app import create_app
    from splitspace.shared.http.server import uvicorn_options

    app = create_app()

    async def probed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/__bench":
            body = json.dumps({"tasks": len(asyncio.all_tasks())}).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    uvicorn.run(probed, host="127.0.0.1", port=port, **uvicorn_options("warning"))


def start_frontend(d: Deployment, env: dict[str, str]) -> TierProcess:
    port = free_port()
    full = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        **d.common_env(),
        "SPLITSPACE_BACKEND_URL": d.backend_urls(),
        **env,
    }
    log = d.workdir / "frontend.log"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-frontend", str(port)],
        env=full,
        cwd=REPO,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )
    return wait_ready(TierProcess("frontend", f"http://127.0.0.1:{port}", proc, log))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


async def probe(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/__bench") as r:
        return int((await r.json())["tasks"])


async def post_jobs(
    url: str, n: int, extra: dict[str, Any] | None = None, hook: Any = None
) -> tuple[float, list[str], int]:
    """POST n jobs, IN_FLIGHT at once; (seconds, ids, refused)."""
    ids: list[str] = []
    refused = 0
    counter = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT)) as s:

        async def worker() -> None:
            nonlocal refused
            for i in counter:
                body = {**BODY, **(extra or {}), **({"webhook_url": hook(i)} if hook else {})}
                async with s.post(f"{url}/v1/jobs", json=body, headers=key(i)) as r:
                    doc = await r.json()
                    if r.status == 202:
                        ids.append(doc["id"])
                    else:
                        refused += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return time.perf_counter() - start, ids, refused


async def queued_phase(work: Path) -> None:
    d = Deployment(work / "queued", model="sleep:600000", quotas=quotas())
    d.workdir.mkdir(parents=True)
    d.write_quotas(quotas())
    d.start_backend()
    fe = start_frontend(d, {"SPLITSPACE_JOBS_PATH": str(work / "queued" / "jobs.sqlite3")})
    try:
        await post_jobs(fe.url, 200)  # warm up (imports, first connections, SQLite pages)
        await asyncio.sleep(1.0)
        rss0, tasks0, socks0 = rss_mb(fe.proc.pid), await probe(fe.url), sockets(fe.proc.pid)
        seconds, ids, refused = await post_jobs(fe.url, JOBS)
        await asyncio.sleep(1.0)  # the client's connections closed
        rss1, tasks1, socks1 = rss_mb(fe.proc.pid), await probe(fe.url), sockets(fe.proc.pid)
        print(
            f"POST /v1/jobs: {len(ids)} accepted in {seconds:.2f} s = {len(ids) / seconds:.0f}/s "
            f"({IN_FLIGHT} in flight, {KEYS} keys; {refused} refused)  goal >= 300/s"
        )
        print(
            f"{len(ids) + 200} jobs queued: frontend RSS {rss0:.0f} -> {rss1:.0f} MB = "
            f"{(rss1 - rss0) * 1024 * 1024 / len(ids):.0f} bytes per job"
        )
        print(
            f"  asyncio tasks {tasks0} -> {tasks1}; open sockets {socks0} -> {socks1} "
            f"(the jobs let in hold one each: at most SPLITSPACE_DOOR_TOTAL = 64)"
        )
    finally:
        fe.stop()
        d.stop()


async def webhook_phase(work: Path) -> None:
    received: dict[str, float] = {}
    finished: dict[str, float] = {}

    async def ok(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        doc = json.loads(body)
        received[doc["data"]["id"]] = now
        finished[doc["data"]["id"]] = doc["data"]["finished_at"]
        return web.Response(status=204)

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/hang", hang)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(100):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def hook(i: int) -> str:
        r = i % 100
        return f"http://127.0.0.1:{ports[r]}/{'hang' if r == 0 else 'ok'}"

    d = Deployment(work / "hooks", model="sleep:20", quotas=quotas())
    d.workdir.mkdir(parents=True)
    d.write_quotas(quotas())
    d.start_backend()
    fe = start_frontend(
        d, {"SPLITSPACE_JOBS_PATH": str(work / "hooks" / "jobs.sqlite3"), "SPLITSPACE_WEBHOOK_ALLOW": "127.0.0.0/8"}
    )
    try:
        _, ids, _ = await post_jobs(fe.url, 300, hook=hook)
        expect = len([i for i in range(300) if i % 100 != 0])
        deadline = time.monotonic() + 120
        while len(received) < expect and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        lat = sorted((received[j] - finished[j]) * 1000 for j in received)
        p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
        print(
            f"webhooks: {len(lat)} of {expect} delivered (100 receivers, one hanging); from the job's end to "
            f"its receiver: p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {lat[-1]:.0f} ms  goal p50 < 200 ms"
        )
    finally:
        fe.stop()
        d.stop()
        await runner.cleanup()


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if "--webhooks-only" not in sys.argv:
            await queued_phase(Path(tmp))
        await webhook_phase(Path(tmp))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-frontend":
        serve_frontend(int(sys.argv[2]))
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        asyncio.run(main())
