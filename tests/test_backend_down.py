"""GPU tier stopped: a clear error in bounded time, never a hang; recovery when it returns."""

from __future__ import annotations

import time

import httpx

from tests.clients import call_rest, error_text, gen_args
from tests.support import Deployment


def test_backend_down_then_back(tmp_path):
    d = Deployment(tmp_path, model="sleep:20").start()
    try:
        with httpx.Client(timeout=60) as c:
            assert call_rest(c, d.frontend.url, "generate", gen_args())[0] == "complete"
            d.backend.stop()
            t0 = time.monotonic()
            final, events = call_rest(c, d.frontend.url, "generate", gen_args())
            elapsed = time.monotonic() - t0
            assert final == "error"
            assert error_text(events).startswith("GPU backend unavailable:"), events
            assert elapsed < 15, f"took {elapsed:.1f} s"
            d.start_backend()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                final, events = call_rest(c, d.frontend.url, "generate", gen_args())
                if final == "complete":
                    break
                time.sleep(0.5)
            assert final == "complete", events
    finally:
        d.stop()


def test_backend_hangs_then_clear_error(tmp_path):
    """A GPU tier that accepts connections but never answers (SIGSTOP) is bounded by the timeout."""
    import signal

    d = Deployment(tmp_path, model="sleep:20", frontend_env={"SPLITSPACE_BACKEND_TIMEOUT_S": "3"}).start()
    try:
        d.backend.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with httpx.Client(timeout=60) as c:
            final, events = call_rest(c, d.frontend.url, "generate", gen_args())
        elapsed = time.monotonic() - t0
        assert final == "error" and error_text(events).startswith("GPU backend unavailable:"), events
        assert elapsed < 12, f"took {elapsed:.1f} s"
        d.backend.proc.send_signal(signal.SIGCONT)
    finally:
        d.stop()
