"""Start splitspace's tiers as processes on loopback and wait until they answer.

Why this module exists: ``splitspace dev`` (:mod:`deploy.local`), the tests and the
benchmarks all start real tiers the same way: ``python -m splitspace.deploy.cli
backend|frontend`` on a free port, configured through ``SPLITSPACE_*`` variables, ready
once ``/health`` answers 200. That is written once, here, in the installed package, so that
``bench/`` and ``tests/`` share it without importing each other.

:class:`Deployment` is both tiers with the secrets they share and the operator's files
(quotas, state), each tier's output in a log file of its work folder. Nothing here loads
Gradio or torch: the tiers do, in their own processes.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from splitspace.deploy import redis_local

__all__ = [
    "Deployment",
    "Launcher",
    "Process",
    "TierProcess",
    "free_port",
    "launch_with",
    "pick_ports_with",
    "popen_launcher",
    "start_tier",
    "tier_command",
    "wait_healthy",
    "wait_ready",
]


class Process(Protocol):
    """What is asked of a started tier: :class:`subprocess.Popen`'s part that the callers use."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


Launcher = Callable[[list[str], dict[str, str], Path], Process]
"""Starts ``splitspace ARGS`` with exactly this environment, its output appended to the log file."""


def popen_launcher(args: list[str], env: dict[str, str], log_path: Path) -> Process:
    """``python -m splitspace.deploy.cli ARGS``: a new interpreter."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(tier_command(*args), env=env, stdout=log, stderr=subprocess.STDOUT)


_port_source: Callable[[], int] | None = None
_launcher: Launcher = popen_launcher


def launch_with(launcher: Launcher | None) -> None:
    """Have :func:`start_tier` start tiers with ``launcher`` (the tests fork them from a process
    that has imported Gradio already); ``None``: :func:`popen_launcher`."""
    global _launcher
    _launcher = launcher or popen_launcher


def pick_ports_with(source: Callable[[], int] | None) -> None:
    """Have :func:`free_port` take its ports from ``source`` (a test run keeps its parallel
    workers on ports of their own); ``None``: any free port the system gives."""
    global _port_source
    _port_source = source


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    return _port_source() if _port_source is not None else redis_local.free_port()


def tier_command(subcommand: str, *args: str) -> list[str]:
    """The command line of one tier (or any ``splitspace`` subcommand) in this interpreter."""
    return [sys.executable, "-m", "splitspace.deploy.cli", subcommand, *args]


def wait_healthy(url: str, proc: Process, timeout_s: float) -> None:
    """Return once ``url``/health answers 200; RuntimeError if ``proc`` exits first or
    ``timeout_s`` passes (the process is left to the caller)."""
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


@dataclass
class TierProcess:
    """One started process, its URL and its log."""

    name: str
    url: str
    proc: Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_tier(
    kind: str, port: int, env: dict[str, str], log_path: Path, *args: str, ready_timeout_s: float = 120
) -> TierProcess:
    """``splitspace backend|frontend`` on 127.0.0.1:``port`` with ``env`` over this
    process' environment, its output appended to ``log_path``; returned once ready."""
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **env}
    proc = _launcher([kind, "--host", "127.0.0.1", "--port", str(port), *args], full_env, log_path)
    return wait_ready(TierProcess(kind, f"http://127.0.0.1:{port}", proc, log_path), ready_timeout_s)


def wait_ready(tier: TierProcess, timeout_s: float = 120) -> TierProcess:
    """Wait until the tier answers /health; the tail of its log in the error if it exits
    or never does (then it is stopped)."""
    try:
        wait_healthy(tier.url, tier.proc, timeout_s)
    except RuntimeError as exc:
        tier.stop()
        raise RuntimeError(f"{tier.name}: {exc}:\n{tier.log()[-3000:]}") from None
    return tier


@dataclass
class Deployment:
    """Both tiers, the secrets they share and the operator's files, in ``workdir``; each
    tier's Gradio cache too (``frontend-files/``, ``gpu-files/``): what one deployment's tiers
    delete after their time-to-live is never another's."""

    workdir: Path
    model: str = "tiny"
    quotas: str | None = None
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    backend_env: dict[str, str] = field(default_factory=dict)
    frontend_env: dict[str, str] = field(default_factory=dict)
    trusted_proxies: int = 1
    backend: TierProcess | None = None
    frontend: TierProcess | None = None
    backend_port: int = field(default_factory=free_port)
    frontend_port: int = field(default_factory=free_port)
    ready_timeout_s: float = 120.0
    """How long a tier may take to answer /health (a real model loading on a GPU: longer)."""

    @property
    def quotas_path(self) -> Path:
        return self.workdir / "quotas.toml"

    @property
    def state_path(self) -> Path:
        return self.workdir / "state.sqlite3"

    def common_env(self) -> dict[str, str]:
        env = {
            "SPLITSPACE_SECRET": self.secret,
            "SPLITSPACE_TRUSTED_PROXIES": str(self.trusted_proxies),
            "SPLITSPACE_BACKEND_TIMEOUT_S": "5",
        }
        if self.quotas is not None:
            env["SPLITSPACE_QUOTAS"] = str(self.quotas_path)
        return env

    def write_quotas(self, text: str) -> None:
        """Replace the quota file in one step (the tiers re-read it when it changes)."""
        self.quotas = text
        tmp = self.quotas_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.quotas_path)

    def start_backend(self) -> TierProcess:
        env = {
            **self.common_env(),
            "SPLITSPACE_MODEL": self.model,
            "SPLITSPACE_ADMIN_TOKEN": self.admin_token,
            "SPLITSPACE_STATE_PATH": str(self.state_path),
            "GRADIO_TEMP_DIR": str(self.workdir / "gpu-files"),
            **self.backend_env,
        }
        self.backend = start_tier(
            "backend", self.backend_port, env, self.workdir / "backend.log", ready_timeout_s=self.ready_timeout_s
        )
        return self.backend

    def start_frontend(self) -> TierProcess:
        env = {
            **self.common_env(),
            "SPLITSPACE_BACKEND_URL": self.backend_urls(),
            "GRADIO_TEMP_DIR": str(self.workdir / "frontend-files"),
            **self.frontend_env,
        }
        self.frontend = start_tier(
            "frontend", self.frontend_port, env, self.workdir / "frontend.log", ready_timeout_s=self.ready_timeout_s
        )
        return self.frontend

    def backend_urls(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    def start(self) -> Deployment:
        """The GPU tier, then the frontend; if either fails to start, neither is left running."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.quotas is not None:
            self.write_quotas(self.quotas)
        try:
            self.start_backend()
            self.start_frontend()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for tier in (self.frontend, self.backend):
            if tier is not None:
                tier.stop()
