"""What the tests share: tiers started as processes on loopback, servers in this process,
the ports they listen on, and waiting for a condition instead of sleeping.

Nothing is mocked: each tier is ``python -m splitspace.deploy.cli backend|frontend`` on a
free port (``splitspace.deploy.processes``), configured through ``SPLITSPACE_*``
variables, with its output in a log file that tests can read (e.g. to check that no secret
is ever logged).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from splitspace.deploy.processes import Deployment, TierProcess, start_tier, wait_ready

__all__ = ["REPO", "Deployment", "TierProcess", "free_port", "sha256", "start_tier", "wait_ready"]
"""Starting tiers lives in ``splitspace.deploy.processes`` (the benchmarks use it too);
re-exported here for the tests."""

REPO = Path(__file__).resolve().parent.parent

PORTS = (15000, 32768)
"""Where the tests' servers listen: below Linux's ephemeral range (32768-60999), so that no
client connection of any test takes a port between its pick and its server's bind."""


class PortPicker:
    """Free ports of this test process alone: each pytest-xdist worker draws from its own
    slice of :data:`PORTS` (``PYTEST_XDIST_WORKER``: gw0, gw1, ...), from a random place in
    it (another run beside this one draws from the same slices), never the same port twice."""

    def __init__(self, worker: str | None, workers: int) -> None:
        index = int(worker[2:]) if worker and worker.startswith("gw") else 0
        width = (PORTS[1] - PORTS[0]) // max(1, workers)
        self.low = PORTS[0] + index * width
        self.width = width
        self.next = random.randrange(width)
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            for _ in range(self.width):
                port = self.low + self.next
                self.next = (self.next + 1) % self.width
                if _bindable(port):
                    return port
        raise RuntimeError(f"no free port in {self.low}-{self.low + self.width - 1}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


free_port = PortPicker(os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
"""A free port for a test's server (the tiers, Redis, in-process servers)."""


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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


def app_deployment(
    workdir: Path, app: str, quotas: str, *, env: dict[str, str] | None = None, gpu_env: dict[str, str] | None = None
) -> Deployment:
    """Both tiers serving ``app`` (``SPLITSPACE_APP``) with ``quotas``, the frontend's door
    letting every call through to the GPU tier's backlog (:data:`GPU_TIER_BACKLOG`); ``env``
    for both tiers, ``gpu_env`` for the GPU tier alone."""
    both = {"SPLITSPACE_APP": app, **(env or {})}
    return Deployment(
        workdir, quotas=quotas, backend_env={**both, **(gpu_env or {})}, frontend_env={**both, **GPU_TIER_BACKLOG}
    )


# -- quota files ---------------------------------------------------------------------------
Settings = dict[str, float]

TIER: Settings = {"weight": 1, "max_running": 1, "max_queued": 8, "gpu_seconds": 3600, "window_s": 3600}
"""A tier with room for a test's calls: one running, eight waiting, an hour of GPU time."""

OPEN_ANONYMOUS: Settings = {**TIER, "address_gpu_seconds": 3600, "requests_per_minute": 100000}
"""Anonymous callers (a test's gradio_client without a key) never limited by their address."""


def tiers_toml(**tiers: Settings) -> str:
    """``[tiers.NAME]`` tables of a quota file, one per keyword, its settings in order."""
    return "".join(
        f"\n[tiers.{name}]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()) for name, settings in tiers.items()
    )


def keys_toml(keys: dict[str, str], raw: Callable[[str], str], secrets: dict[str, str] | None = None) -> str:
    """``[[keys]]`` tables of a quota file: each name's tier (``keys``), the digest of its raw
    key ``raw(name)`` and, where ``secrets`` has one, its webhook secret."""
    secrets = secrets or {}
    return "".join(
        f'\n[[keys]]\nname = "{name}"\ntier = "{tier}"\nsha256 = "{sha256(raw(name))}"\n'
        + (f'webhook_secret = "{secrets[name]}"\n' if name in secrets else "")
        for name, tier in keys.items()
    )
