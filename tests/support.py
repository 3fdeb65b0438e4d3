"""Start the real tiers as processes on loopback, for the tests and the benchmarks.

Nothing is mocked: each tier is ``python -m splitspace.deploy.cli backend|frontend`` on a
free port, configured through ``SPLITSPACE_*`` variables, with its output in a
log file that tests can read (e.g. to check that no secret is ever logged).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class TierProcess:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
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
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **env}
    cmd = [sys.executable, "-m", "splitspace.deploy.cli", kind, "--host", "127.0.0.1", "--port", str(port), *args]
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return wait_ready(TierProcess(kind, f"http://127.0.0.1:{port}", proc, log_path), ready_timeout_s)


def wait_ready(tier: TierProcess, timeout_s: float = 120) -> TierProcess:
    """Wait until the tier answers /health; its log in the error if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tier.proc.poll() is not None:
            raise RuntimeError(f"{tier.name} exited with {tier.proc.returncode}:\n{tier.log()[-3000:]}")
        try:
            if httpx.get(f"{tier.url}/health", timeout=1).status_code == 200:
                return tier
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tier.stop()
    raise RuntimeError(f"{tier.name} not ready in {timeout_s} s:\n{tier.log()[-3000:]}")


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app in this process (for a GPU tier built around a test's own model)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_gpu_tier(workdir: Path, secret: str, around_generate: Any) -> Iterator[str]:
    """A GPU tier in this process whose model (``sleep:1``) runs through ``around_generate``:
    given the model's own ``generate(req, seed)``, it returns the one the tier uses. For
    what a real model cannot be made to do on demand (fail, report its calling context)."""
    from splitspace.gpu_backend.app import build_app
    from splitspace.gpu_backend.workload.model import ModelExecutor
    from splitspace.shared.config.settings import Settings

    executor = ModelExecutor.from_spec("sleep:1")
    executor.generate = around_generate(executor.generate)  # type: ignore[method-assign]
    settings = Settings(secret=secret, model="sleep:1", state_path=workdir / "state.sqlite3")
    with serve_in_thread(build_app(settings, executor)) as url:
        yield url


@contextlib.contextmanager
def serve_gpu_tier_with(settings: Any, executor: Any) -> Iterator[tuple[str, Any]]:
    """A GPU tier in this process from the test's own ``settings`` and model executor: its
    URL and its ``GpuTier``, for what only the process can show (e.g. that a model change
    is waiting for the GPU to go idle: ``tier.runner.paused``)."""
    from splitspace.gpu_backend.app import build_app

    app = build_app(settings, executor)
    with serve_in_thread(app) as url:
        yield url, app.state.tier


def held_model(spec: str, release: threading.Event, timeout_s: float = 120) -> Any:
    """A model executor (``sleep:MS``) whose every call waits for ``release`` first: a job
    that stays on the GPU until the test lets it go (a real model cannot be held on demand)."""
    from splitspace.gpu_backend.workload.model import ModelExecutor

    executor = ModelExecutor.from_spec(spec)
    generate = executor.generate

    def held(req, seed):  # type: ignore[no-untyped-def]
        if not release.wait(timeout_s):
            raise TimeoutError(f"the test never released the held model {spec}")
        return generate(req, seed)

    executor.generate = held  # type: ignore[method-assign]
    return executor


def gpu_depth(url: str) -> tuple[int, int]:
    """(queued, running) jobs on a GPU tier, from its /health; (-1, -1) if it does not answer."""
    try:
        doc = httpx.get(f"{url}/health", timeout=5).json()
    except httpx.HTTPError:
        return -1, -1
    return doc["queued"], doc["running"]


def wait_for(check, timeout_s: float, every_s: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``check`` until it returns something truthy or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


def in_threads(n: int, call: Any, timeout_s: float = 120) -> list[Any]:
    """``call(i)`` for i in ``range(n)``, each in its own thread, all released at once (a
    barrier) so that they race; their results in order. A thread still running after
    ``timeout_s`` fails the test rather than leaving a hole in the results."""
    out: list[Any] = [None] * n
    go = threading.Barrier(n)

    def one(i: int) -> None:
        go.wait()
        out[i] = call(i)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} of {n} calls still running after {timeout_s} s"
    return out


# These tests look at a backlog the GPU tier holds (its positions, its cancellations, its
# metrics): the frontend's door lets every request through at once here, instead of two per
# client and 64 in all (cpu_frontend/door/door.py; its own tests are tests/test_door.py, test_crowd.py).
GPU_TIER_BACKLOG = {"SPLITSPACE_DOOR_PER_FLOW": "1000", "SPLITSPACE_DOOR_TOTAL": "1000"}


@dataclass
class Deployment:
    """Both tiers, the secrets they share and the operator's files."""

    workdir: Path
    model: str = "tiny"
    quotas: str | None = None
    transport: str = "direct"
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    backend_env: dict[str, str] = field(default_factory=dict)
    frontend_env: dict[str, str] = field(default_factory=dict)
    trusted_proxies: int = 1
    backend: TierProcess | None = None
    frontend: TierProcess | None = None
    backend_port: int = field(default_factory=free_port)
    frontend_port: int = field(default_factory=free_port)

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
            **self.backend_env,
        }
        self.backend = start_tier("backend", self.backend_port, env, self.workdir / "backend.log")
        return self.backend

    def start_frontend(self) -> TierProcess:
        env = {
            **self.common_env(),
            "SPLITSPACE_BACKEND_URL": self.backend_urls(),
            "SPLITSPACE_TRANSPORT": self.transport,
            **self.frontend_env,
        }
        self.frontend = start_tier("frontend", self.frontend_port, env, self.workdir / "frontend.log")
        return self.frontend

    def backend_urls(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    def start(self) -> Deployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.quotas is not None:
            self.write_quotas(self.quotas)
        self.start_backend()
        self.start_frontend()
        return self

    def stop(self) -> None:
        for tier in (self.frontend, self.backend):
            if tier is not None:
                tier.stop()
