"""The local runner behind ``splitspace dev``: both tiers as separate processes.

A fresh shared secret per run (the tiers must agree, nobody else needs it),
the GPU tier started first, a readiness wait on each tier's ``/health``, both
URLs printed, and both stopped together on Ctrl-C, SIGTERM (systemd,
``docker stop``, an IDE's stop button) or SIGHUP (a closed terminal), or when
either dies. A normal stop prints "stopped".

The tiers run in their own session, so a Ctrl-C in the terminal reaches only
this runner, which stops the frontend first and the GPU tier after it (the
other order made the frontend report the GPU tier "down" on every normal
stop). On Linux each tier also asks the kernel for SIGTERM when this runner
dies (``PR_SET_PDEATHSIG``), so a runner killed outright (SIGKILL, the OOM
killer) leaves no tier behind; elsewhere each tier would be left to the
signals above. Ctrl-C works even when this runner was started with SIGINT
ignored (as a background job of a script is): that is why ``splitspace dev``
sometimes did not stop on Ctrl-C (or on a test's SIGINT) in the first release.
"""

from __future__ import annotations

import ctypes
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


class Stopped(Exception):
    """SIGTERM or SIGHUP arrived: stop both tiers, as on Ctrl-C."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux), and exit now if it
    already has (the parent may die between fork and prctl)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def start_tier(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    parent = os.getpid()
    return subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(parent))


def stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    """Stop each process in turn (SIGTERM, then SIGKILL after ``grace_s``), in the order given."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace_s)
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
    previous = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGINT)}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stopped)
    # Ctrl-C must stop dev even when it inherited SIGINT ignored (a background job of a
    # non-interactive shell, a test runner started that way): Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for tier in (backend, frontend):
            tier.proc = start_tier(tier.args, env)
            procs.append(tier.proc)
            wait_ready(tier.url, tier.proc, ready_timeout_s)
        print(f"splitspace dev: model {model}", flush=True)
        print(f"  GPU tier  {backend_url}  (not for the public)", flush=True)
        print(f"  frontend  {frontend_url}  <- open this", flush=True)
        print("Ctrl-C (or SIGTERM) stops both.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.3)
        dead = next(t for t in (backend, frontend) if t.proc is not None and t.proc.poll() is not None)
        print(f"splitspace dev: the {dead.name} exited ({dead.proc.returncode}); stopping", flush=True)  # type: ignore[union-attr]
        return 1
    except (KeyboardInterrupt, Stopped):
        _ignore_stop_signals()
        print("splitspace dev: stopping", flush=True)
        stop(list(reversed(procs)))  # the frontend first: it must not see its GPU tier go
        print("splitspace dev: stopped", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"splitspace dev: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        _ignore_stop_signals()
        stop(list(reversed(procs)))
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _ignore_stop_signals() -> None:
    """While stopping, a second Ctrl-C or SIGTERM must not cut the stop short."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
