"""Tiers forked from a warm process: a tier start costs half a second of CPU, not five.

Why this module exists: most of a tier's start is importing Gradio and torch (about 5 s of
CPU here), and the suite starts some seventy tiers through ``splitspace.deploy.processes``.
Each test process gets one *zygote*: this file run as a program, which imports the tiers'
modules once and then forks a child per tier; the child takes the tier's environment, output
file and command line and runs ``splitspace backend|frontend`` as ``python -m
splitspace.deploy.cli`` would. A tier is still a process of its own (its pid, its port, its
log; signals, kills and restarts as before); what is not exercised here is the interpreter's
start, which ``splitspace dev`` (tests/test_dev.py), the Spaces bundles (tests/test_deploy.py)
and the benchmarks still do the usual way.

The zygote reaps its children and leaves each exit status in a file, so that
:class:`ForkedProcess` answers like :class:`subprocess.Popen` (``poll``, ``wait``,
``returncode``). Tiers die with the zygote (``PR_SET_PDEATHSIG``), and the zygote stops when its
test process closes its pipe or dies.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
WARM_MODULES = ("splitspace.deploy.cli", "splitspace.cpu_frontend.app", "splitspace.gpu_backend.app")


class ForkedProcess:
    """A tier forked by the zygote, with the part of :class:`subprocess.Popen` the tests use."""

    def __init__(self, pid: int, status_dir: Path) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._status = status_dir / str(pid)
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already (and reaped): its status is in the file
            self._pidfd = None

    def _exited(self, timeout: float | None) -> bool:
        return self._pidfd is None or bool(select.select([self._pidfd], [], [], timeout)[0])

    def _collect(self) -> int:
        deadline = time.monotonic() + 10  # the zygote reaps within a tenth of a second
        while not self._status.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the zygote left no exit status for {self.pid}")
            time.sleep(0.01)
        self.returncode = os.waitstatus_to_exitcode(int(self._status.read_text()))
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None and self._exited(0):
            self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired(f"tier {self.pid}", timeout or 0)
        return self._collect()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self._pidfd is not None:  # never another process that took its pid
            signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmStarter:
    """This test process' zygote, started at the first tier; a launcher for
    ``splitspace.deploy.processes.launch_with``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zygote: subprocess.Popen[str] | None = None
        self._status_dir = Path(tempfile.mkdtemp(prefix="splitspace-zygote-"))

    def _start(self) -> subprocess.Popen[str]:
        if self._zygote is None or self._zygote.poll() is not None:
            with open(self._status_dir / "zygote.log", "ab") as log:
                self._zygote = subprocess.Popen(
                    [sys.executable, __file__, str(self._status_dir)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"},
                )
        return self._zygote

    def __call__(self, args: list[str], env: dict[str, str], log_path: Path) -> Any:
        if "--reload" in args:  # uvicorn's reloader starts its own processes: the usual way
            from splitspace.deploy.processes import popen_launcher

            return popen_launcher(args, env, log_path)
        with self._lock:
            zygote = self._start()
            assert zygote.stdin is not None and zygote.stdout is not None
            request = {"args": args, "env": env, "log": str(log_path), "cwd": os.getcwd()}  # as a Popen's
            zygote.stdin.write(json.dumps(request) + "\n")
            zygote.stdin.flush()
            answer = zygote.stdout.readline()
        if not answer:
            log = (self._status_dir / "zygote.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the tier zygote exited ({zygote.wait()}):\n{log}")
        return ForkedProcess(json.loads(answer)["pid"], self._status_dir)

    def close(self) -> None:
        if self._zygote is not None and self._zygote.poll() is None:
            assert self._zygote.stdin is not None
            self._zygote.stdin.close()  # it stops; tiers still running get SIGTERM (PDEATHSIG)
            try:
                self._zygote.wait(10)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait()


# -- the zygote ------------------------------------------------------------------------------
def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _reap(status_dir: Path) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        tmp = status_dir / f".{pid}"
        tmp.write_text(str(status))
        tmp.replace(status_dir / str(pid))


def _become_tier(request: dict[str, Any], zygote_pid: int) -> None:
    """In the forked child: the tier's output, environment and command line, then its run
    (its exit, like the interpreter's, by SystemExit; never returns to the zygote's loop)."""
    _die_with_parent()
    if os.getppid() != zygote_pid:
        os._exit(1)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdout.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path.insert(0, request["cwd"])  # where ``python -m`` puts it
    for name in ("numpy.random", "torch"):  # a fresh process draws fresh seeds (random reseeds itself)
        module = sys.modules.get(name)
        if module is not None:
            module.seed()
    sys.argv = ["splitspace", *request["args"]]
    from splitspace.deploy.cli import main

    main()
    raise SystemExit(0)


def serve(status_dir: Path) -> None:
    """Import the tiers' modules, then fork one child per request line on stdin (answering its
    pid on stdout) until stdin closes: when its test process closes it, or dies."""
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    me = os.getpid()
    requests = sys.stdin.buffer
    while True:
        _reap(status_dir)
        if not select.select([requests], [], [], 0.1)[0]:
            continue
        line = requests.readline()
        if not line:
            break
        pid = os.fork()
        if pid == 0:
            _become_tier(json.loads(line), me)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # this folder's modules (support, clients, ...) are no tier's business
    serve(Path(sys.argv[1]))
