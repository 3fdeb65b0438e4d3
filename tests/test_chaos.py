"""The GPU tier killed and restarted under load: every request ends, none hangs, none is charged twice.

Several clients (one address each) call the frontend back to back while the GPU tier
(``sleep:200``) is killed outright (SIGKILL) and started again on the same port and
usage store. What a user would check:

- every request ends with its image or the clear "GPU backend unavailable" error, within
  the frontend's backend timeout (plus the request's own work): none hangs;
- every request started once the restarted GPU tier answers ``/health`` succeeds
  (no stale connection of the frontend's pool fails the first calls);
- each client's usage (its address's, which all of its sessions share) is what its images
  used, plus at most the reservation of the one
  request it had in flight when the GPU tier died (held for the window: the new process
  cannot know that request's fate): never a second charge for one request.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.clients import call_rest, error_text, gen_args
from tests.conftest import QUOTAS
from tests.support import Deployment, start_tier, wait_for

CLIENTS = 6
BACKEND_TIMEOUT_S = 5.0  # Deployment (splitspace.deploy.processes) sets SPLITSPACE_BACKEND_TIMEOUT_S=5
JOB_S = 0.2
IN_FLIGHT_ESTIMATE_S = 1.0
"""More than any estimate of a 64x64 ``sleep:200`` job: the most a killed request may stay charged."""


@dataclass
class Call:
    client: int
    started: float
    ended: float = 0.0
    final: str = ""
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _address(i: int) -> str:
    return f"203.0.113.{10 + i}"


def _load(base: str, i: int, stop: threading.Event, calls: list[Call]) -> None:
    with httpx.Client(timeout=60) as c:
        n = 0
        while not stop.is_set():
            call = Call(i, time.monotonic())
            try:
                call.final, events = call_rest(
                    c, base, "generate", gen_args(seed=1000 * i + n), {"x-forwarded-for": _address(i)}
                )
                if call.final == "complete":
                    call.info = events[-1][1][1]
                else:
                    call.error = error_text(events)
            except httpx.HTTPError as exc:
                call.final, call.error = "http error", repr(exc)
            call.ended = time.monotonic()
            calls.append(call)
            n += 1


def test_gpu_tier_killed_and_restarted_under_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = Deployment(tmp_path, model="sleep:200", quotas=QUOTAS)
    d.start()
    try:
        assert d.backend is not None and d.frontend is not None
        calls: list[Call] = []
        stop = threading.Event()
        threads = [threading.Thread(target=_load, args=(d.frontend.url, i, stop, calls)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        assert wait_for(lambda: sum(c.final == "complete" for c in calls) >= CLIENTS, timeout_s=60)
        killed_at = time.monotonic()
        d.backend.proc.send_signal(signal.SIGKILL)
        d.backend.proc.wait()
        assert wait_for(lambda: any(c.started > killed_at and c.final != "complete" for c in calls), timeout_s=30)
        env = {
            **d.common_env(),
            "SPLITSPACE_MODEL": d.model,
            "SPLITSPACE_ADMIN_TOKEN": d.admin_token,
            "SPLITSPACE_STATE_PATH": str(d.state_path),
        }
        d.backend = start_tier("backend", d.backend_port, env, tmp_path / "backend2.log")
        back_at = time.monotonic()  # start_tier returned: the new GPU tier answers /health
        assert wait_for(
            lambda: sum(c.started > back_at and c.final == "complete" for c in calls) >= 2 * CLIENTS, timeout_s=60
        )
        stop.set()
        for t in threads:
            t.join(timeout=BACKEND_TIMEOUT_S + 30)
        assert not any(t.is_alive() for t in threads), "a request hung"

        for call in calls:  # each ends with its image or the clear error, in bounded time
            assert call.final == "complete" or call.error.startswith("GPU backend unavailable"), call
            assert call.ended - call.started < BACKEND_TIMEOUT_S + 10 * JOB_S + 5, call
        assert any(c.error for c in calls), "the kill failed no request: it was not under load"
        after = [c for c in calls if c.started > back_at]
        assert after and all(c.final == "complete" for c in after), [c for c in after if c.final != "complete"][:3]

        with httpx.Client(timeout=30) as c:
            for i in range(CLIENTS):
                final, events = call_rest(c, d.frontend.url, "quota", [], {"x-forwarded-for": _address(i)})
                assert final == "complete", events
                # The address's usage: its first call is the address, later ones a session (cookie).
                used = events[-1][1][0]["address"]["used"]
                charged = sum(x.info["gpu_s"] for x in calls if x.client == i and x.final == "complete")
                assert used >= charged - 0.05, (i, used, charged)
                assert used <= charged + IN_FLIGHT_ESTIMATE_S, (i, used, charged)
    finally:
        d.stop()
