"""A throwaway ``redis-server`` on loopback, for ``splitspace dev`` and the tests.

Why this module exists: several local tiers share their limits only through Redis, and
a new user should not have to run one by hand. This starts Debian's ``redis-server`` on a
free port with nothing persisted (``--save "" --appendonly no``), waits until it answers
``PING``, and stops it (SIGTERM, then SIGKILL). It can be stopped and started again on the
same port, or paused and resumed (a hung Redis), which is how the tests take Redis away
from running tiers.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["LocalRedis", "RedisNotInstalled", "free_port", "redis_server_path"]

INSTALL_HINT = "install the Debian package redis-server (apt-get install redis-server)"


class RedisNotInstalled(RuntimeError):
    """``redis-server`` is not on PATH."""


def redis_server_path() -> str:
    """The ``redis-server`` executable, or :class:`RedisNotInstalled` saying what to install."""
    path = shutil.which("redis-server")
    if path is None:
        raise RedisNotInstalled(f"redis-server was not found on PATH: {INSTALL_HINT}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class LocalRedis:
    """One ``redis-server`` process on ``host:port`` (a free port unless given)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, workdir: Path | None = None) -> None:
        self.executable = redis_server_path()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="splitspace-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ready_timeout_s: float = 20.0) -> LocalRedis:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + ready_timeout_s
        while not _answers_ping(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer within {ready_timeout_s:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers, the
        way a hung or partitioned Redis looks to its clients. Its data is kept."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 5) -> str:
        path = self.workdir / "redis.log"
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
