"""The local runner behind ``splitspace dev``: both tiers as separate processes.

A fresh shared secret per run (the tiers must agree, nobody else needs it),
the GPU tier started first, a readiness wait on each tier's ``/health``, both
URLs printed, and both stopped together on Ctrl-C or when either dies.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass
class Tier:
    name: str
    args: list[str]
    url: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def tier_command(subcommand: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", subcommand, *args]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready within {timeout_s:.0f} s")


def stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_dev(
    *,
    model: str,
    frontend_port: int,
    backend_port: int,
    host: str = "127.0.0.1",
    extra_env: dict[str, str] | None = None,
    ready_timeout_s: float = 120.0,
    reload: bool = False,
) -> int:
    env = dict(os.environ)
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env["SPLITSPACE_SECRET"] = secrets.token_urlsafe(32)
    if reload:
        env["SPLITSPACE_DEV_RELOAD"] = "1"
    env.update(extra_env or {})
    backend_url = f"http://{host}:{backend_port}"
    frontend_url = f"http://{host}:{frontend_port}"
    reload_flag = ["--reload"] if reload else []
    backend = Tier("GPU tier", tier_command(
        "backend", "--host", host, "--port", str(backend_port), "--model", model, *reload_flag), backend_url)
    frontend = Tier("frontend", tier_command(
        "frontend", "--host", host, "--port", str(frontend_port), "--backend-url", backend_url, *reload_flag),
        frontend_url)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for tier in (backend, frontend):
            tier.proc = subprocess.Popen(tier.args, env=env)
            procs.append(tier.proc)
            wait_ready(tier.url, tier.proc, ready_timeout_s)
        print(f"splitspace dev: model {model}", flush=True)
        print(f"  GPU tier  {backend_url}  (not for the public)", flush=True)
        print(f"  frontend  {frontend_url}  <- open this", flush=True)
        print("Ctrl-C stops both.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.3)
        dead = next(t for t in (backend, frontend) if t.proc is not None and t.proc.poll() is not None)
        print(f"splitspace dev: the {dead.name} exited ({dead.proc.returncode}); stopping", flush=True)  # type: ignore[union-attr]
        return 1
    except KeyboardInterrupt:
        print("splitspace dev: stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"splitspace dev: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop(procs)
