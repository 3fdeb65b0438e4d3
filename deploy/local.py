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

Operators get the admin API and the dashboard on every run: the GPU tiers get the
token given (``--admin-token`` or ``SPLITSPACE_ADMIN_TOKEN``) or a fresh one, and the
dashboard's URL and the exact ``splitspace quota list`` command are printed with the
tiers' URLs; a fresh token is printed only to a terminal, never into a redirected log.

The developer's app (``splitspace dev APP``) reaches every tier as ``SPLITSPACE_APP``
(an absolute ``file.py:NAME``), and with ``--reload`` each tier also watches the app's
folder and its packages (``deploy/serve.py``), so an edit of the app restarts both.

Scale-out (``--backends N --frontends M``): N GPU tiers and M frontends, each frontend
given every GPU tier's URL, and, when N or M is above 1, a throwaway ``redis-server``
(:mod:`deploy.redis_local`) whose URL every tier gets as ``SPLITSPACE_REDIS_URL``, with
``SPLITSPACE_REPLICAS`` the count of its own kind. The first tier of each kind listens
on the given port, the others on free ports; all URLs are printed.
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
from pathlib import Path
from typing import TextIO

from splitspace.deploy.processes import tier_command, wait_healthy
from splitspace.deploy.redis_local import LocalRedis, free_port

DASHBOARD_PATH = "/admin/ui"
"""Where the GPU tier serves the operators' dashboard (``gpu_backend/ops/dashboard.py``; not
imported from there: that would load Gradio into this runner)."""


@dataclass
class Tier:
    name: str
    args: list[str]
    url: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict)
    """Variables of this tier alone, over the run's environment."""


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


def dev_tiers(
    *,
    host: str,
    model: str,
    frontend_port: int,
    backend_port: int,
    backends: int = 1,
    frontends: int = 1,
    reload: bool = False,
    redis_url: str | None = None,
) -> list[Tier]:
    """The tiers of one dev run, GPU tiers first (the frontends need them up)."""
    if backends < 1 or frontends < 1:
        raise ValueError(f"--backends and --frontends must be at least 1, got {backends} and {frontends}")
    reload_flag = ["--reload"] if reload else []
    taken = {frontend_port, backend_port}

    def port(first: int, i: int) -> int:
        if i == 0:
            return first
        while (p := free_port(host)) in taken:
            pass
        taken.add(p)
        return p

    def shared(count: int) -> dict[str, str]:
        return {} if redis_url is None else {"SPLITSPACE_REDIS_URL": redis_url, "SPLITSPACE_REPLICAS": str(count)}

    gpu: list[Tier] = []
    for i in range(backends):
        p = port(backend_port, i)
        gpu.append(
            Tier(
                "GPU tier",
                tier_command("backend", "--host", host, "--port", str(p), "--model", model, *reload_flag),
                f"http://{host}:{p}",
                env=shared(backends),
            )
        )
    backend_urls = ",".join(t.url for t in gpu)
    front: list[Tier] = []
    for i in range(frontends):
        p = port(frontend_port, i)
        front.append(
            Tier(
                "frontend",
                tier_command("frontend", "--host", host, "--port", str(p), "--backend-url", backend_urls, *reload_flag),
                f"http://{host}:{p}",
                env=shared(frontends),
            )
        )
    return gpu + front


def start_dev_redis(host: str, workdir: str | None = None) -> tuple[LocalRedis, Tier]:
    """A ``redis-server`` for a scale-out run (its log in ``workdir``), as a :class:`Tier`
    so it is watched and stopped like the others. ``RedisNotInstalled`` (a RuntimeError)
    names the Debian package."""
    server = LocalRedis(host=host, workdir=None if workdir is None else Path(workdir)).start()
    return server, Tier("Redis", [server.executable], server.url, proc=server.proc)


@dataclass(frozen=True)
class DevAdmin:
    """The run's admin token, and whether this run made it (then it is shown once)."""

    token: str = field(repr=False)
    made: bool

    @classmethod
    def for_run(cls, given: str | None) -> DevAdmin:
        return cls(given, False) if given else cls(secrets.token_urlsafe(24), True)


def print_operators(admin: DevAdmin, backend_url: str, out: TextIO) -> None:
    """How to reach the admin API and the dashboard of this run. A token this run made is
    printed only to a terminal (the person who ran dev), never into a redirected log."""
    if not admin.made:
        token, note = "<your admin token>", "the admin token you gave"
    elif out.isatty():
        token, note = admin.token, "an admin token made for this run, shown only here"
    else:
        token, note = (
            "<not shown>",
            (
                "an admin token made for this run, not shown: this output is not a "
                "terminal; give one with --admin-token or SPLITSPACE_ADMIN_TOKEN"
            ),
        )
    print(f"Operators ({note}):", file=out, flush=True)
    print(f"  dashboard {backend_url}{DASHBOARD_PATH}  (log in with the admin token)", file=out, flush=True)
    print(
        f"  SPLITSPACE_BACKEND_URL={backend_url} SPLITSPACE_ADMIN_TOKEN={token} splitspace quota list",
        file=out,
        flush=True,
    )


def print_urls(serving: str, tiers: Sequence[Tier], admin: DevAdmin) -> None:
    """``serving``: what the run serves ("model tiny", "app /path/app.py:demo")."""
    gpu = [t for t in tiers if t.name == "GPU tier"]
    front = [t for t in tiers if t.name == "frontend"]
    redis_tier = next((t for t in tiers if t.name == "Redis"), None)
    scale = "" if redis_tier is None else f", {len(gpu)} GPU tier(s), {len(front)} frontend(s) on one Redis"
    print(f"splitspace dev: {serving}{scale}", flush=True)
    for tier in gpu:
        print(f"  GPU tier  {tier.url}  (not for the public)", flush=True)
    for i, tier in enumerate(front):
        print(f"  frontend  {tier.url}" + ("  <- open this" if i == 0 else ""), flush=True)
    if redis_tier is not None:
        print(f"  Redis     {redis_tier.url}  (shared limits, nothing persisted)", flush=True)
    print_operators(admin, gpu[0].url, sys.stdout)
    print(
        "Ctrl-C (or SIGTERM) stops both." if redis_tier is None else "Ctrl-C (or SIGTERM) stops them all.", flush=True
    )


def run_dev(
    *,
    model: str,
    frontend_port: int,
    backend_port: int,
    host: str = "127.0.0.1",
    extra_env: dict[str, str] | None = None,
    ready_timeout_s: float = 120.0,
    reload: bool = False,
    backends: int = 1,
    frontends: int = 1,
    admin_token: str | None = None,
    app: str | None = None,
) -> int:
    """Run the tiers until Ctrl-C (or a signal, or a tier dies); the exit status.
    ``admin_token`` None: a fresh one for the run (see :func:`print_operators`). ``app``: the
    developer's app (``/abs/file.py:NAME``, given to every tier as ``SPLITSPACE_APP``; with
    ``reload`` each tier also watches its folder); None: the built-in app, serving ``model``."""
    admin = DevAdmin.for_run(admin_token)
    env = dict(os.environ)
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env["SPLITSPACE_SECRET"] = secrets.token_urlsafe(32)
    env.pop("SPLITSPACE_ADMIN_TOKEN", None)  # the GPU tiers' alone (below)
    if reload:
        env["SPLITSPACE_DEV_RELOAD"] = "1"
    if app is not None:
        env["SPLITSPACE_APP"] = app
    env.update(extra_env or {})
    tiers: list[Tier] = []
    procs: list[subprocess.Popen[bytes]] = []
    previous = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGINT)}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stopped)
    # Ctrl-C must stop dev even when it inherited SIGINT ignored (a background job of a
    # non-interactive shell, a test runner started that way): Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if backends > 1 or frontends > 1:
            _, redis_tier = start_dev_redis(host, ".splitspace/redis")
            procs.append(redis_tier.proc)  # type: ignore[arg-type]
            tiers.append(redis_tier)
        redis_url = tiers[0].url if tiers else None
        tiers += dev_tiers(
            host=host,
            model=model,
            frontend_port=frontend_port,
            backend_port=backend_port,
            backends=backends,
            frontends=frontends,
            reload=reload,
            redis_url=redis_url,
        )
        for kind in ("GPU tier", "frontend"):  # GPU tiers first, each kind started together
            group = [t for t in tiers if t.name == kind]
            for tier in group:
                admin_env = {"SPLITSPACE_ADMIN_TOKEN": admin.token} if kind == "GPU tier" else {}
                tier.proc = start_tier(tier.args, {**env, **tier.env, **admin_env})
                procs.append(tier.proc)
            for tier in group:
                assert tier.proc is not None  # started just above
                wait_healthy(tier.url, tier.proc, ready_timeout_s)
        print_urls(f"app {app}" if app else f"model {model}", tiers, admin)
        while all(p.poll() is None for p in procs):
            time.sleep(0.3)
        dead = next(t for t in tiers if t.proc is not None and t.proc.poll() is not None)
        print(f"splitspace dev: the {dead.name} exited ({dead.proc.returncode}); stopping", flush=True)  # type: ignore[union-attr]
        return 1
    except (KeyboardInterrupt, Stopped):
        _ignore_stop_signals()
        print("splitspace dev: stopping", flush=True)
        stop(list(reversed(procs)))  # the frontend first: it must not see its GPU tier go
        print("splitspace dev: stopped", flush=True)
        return 0
    except (RuntimeError, ValueError) as exc:
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
