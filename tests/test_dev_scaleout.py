"""`splitspace dev --backends N [--frontends M]`: several tiers on one local Redis."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from gradio_client import Client
from PIL import Image

from tests.support import free_port


class DevRun:
    """``splitspace dev`` as a process, its output read line by line as it comes."""

    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.frontend_port, self.backend_port = free_port(), free_port()
        base = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "SPLITSPACE_STATE_PATH": str(cwd / "state.sqlite3")}
        base.pop("SPLITSPACE_SECRET", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "splitspace.deploy.cli",
                "dev",
                "--frontend-port",
                str(self.frontend_port),
                "--backend-port",
                str(self.backend_port),
                *args,
            ],
            cwd=cwd,
            env={**base, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, pattern: str, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"splitspace dev ended before {pattern!r}:\n{''.join(self.lines)}")
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{''.join(self.lines)}")

    def urls(self, label: str) -> list[str]:
        return [m.group(1) for line in self.lines if (m := re.match(rf"\s+{label}\s+(\S+)", line))]

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        return self.proc.returncode


def _children_env(parent: int) -> dict[int, tuple[list[str], dict[str, str]]]:
    """argv and environment of each child of ``parent`` (from /proc)."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        proc = Path("/proc") / pid
        try:
            argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
            env = dict(
                item.split("=", 1) for item in proc.joinpath("environ").read_bytes().decode().split("\0") if "=" in item
            )
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(pid)] = ([a.decode() for a in argv if a], env)
    return out


def _refused(url: str) -> bool:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def test_dev_with_two_backends_runs_two_gpu_tiers_on_one_redis_and_generates(tmp_path: Path) -> None:
    run = DevRun(tmp_path, "--backends", "2", "--model", "sleep:1")
    try:
        run.wait_for_line(r"Ctrl-C \(or SIGTERM\) stops")
        gpu, front, redis_urls = run.urls("GPU tier"), run.urls("frontend"), run.urls("Redis")
        assert len(gpu) == 2 and len(set(gpu)) == 2 and len(front) == 1 and len(redis_urls) == 1
        assert gpu[0].endswith(f":{run.backend_port}") and front[0].endswith(f":{run.frontend_port}")
        for url in gpu + front:
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200

        import redis

        assert redis.Redis.from_url(redis_urls[0], socket_timeout=2).ping()

        children = _children_env(run.proc.pid)
        backends = [env for argv, env in children.values() if "backend" in argv]
        frontends = [(argv, env) for argv, env in children.values() if "frontend" in argv]
        assert len(backends) == 2 and len(frontends) == 1
        assert all(env.get("SPLITSPACE_REDIS_URL") == redis_urls[0] for env in backends)
        assert all(env.get("SPLITSPACE_REPLICAS") == "2" for env in backends)
        argv, env = frontends[0]
        assert argv[argv.index("--backend-url") + 1] == ",".join(gpu)  # the frontend knows both
        assert env.get("SPLITSPACE_REDIS_URL") == redis_urls[0] and env.get("SPLITSPACE_REPLICAS") == "1"

        path, info = Client(front[0], verbose=False).predict("a cat", "", 64, 64, 2, 0.0, 3, api_name="/generate")
        assert Image.open(path).size == (64, 64) and info["seed"] == 3
    finally:
        code = run.interrupt()
    assert code == 0
    assert all(_refused(url) for url in gpu + front + redis_urls)  # all stopped, Redis too


def test_dev_says_which_package_to_install_when_redis_server_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    run = DevRun(tmp_path, "--backends", "2", "--model", "sleep:1", env={"PATH": str(empty)})
    run.proc.wait(timeout=60)
    run.wait_for_line(r"redis-server", timeout_s=10)
    assert run.proc.returncode == 1
    assert any("Debian package redis-server" in line for line in run.lines), run.lines


def test_dev_with_one_of_each_starts_no_redis(tmp_path: Path) -> None:
    run = DevRun(tmp_path, "--model", "sleep:1")
    try:
        run.wait_for_line(r"Ctrl-C \(or SIGTERM\) stops")
        assert run.urls("Redis") == [] and len(run.urls("GPU tier")) == 1
        children = _children_env(run.proc.pid)
        assert all("SPLITSPACE_REDIS_URL" not in env for _, env in children.values())
        assert not any("redis-server" in " ".join(argv) for argv, _ in children.values())
    finally:
        assert run.interrupt() == 0
