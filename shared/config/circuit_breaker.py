"""The circuit breaker every tier puts in front of its shared store (Redis), and the rules
of what a tier does while it is open (``SPLITSPACE_REDIS_FAILURE``).

Why it exists: a Redis that is down must cost a caller one timeout, not one per call.
After a failure no call goes to Redis for ``retry_s``; then one caller probes, and the
first success closes the breaker (recovery is automatic). Meanwhile a tier refuses
(``closed``) or decides alone with its share of each limit (``local``). It lives in ``shared/`` because
both tiers use it (``gpu_backend/stores/resilient_store.py``, ``cpu_frontend/door/inflight_ledger.py``)
and the frontend's bundle carries no ``gpu_backend``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["CircuitBreaker", "DEFAULT_RETRY_S", "FailureMode", "check_failure_mode", "local_share"]

DEFAULT_RETRY_S = 3.0
"""After a failure, Redis is tried again this much later (one probe call)."""

FailureMode = Literal["closed", "local"]


def check_failure_mode(mode: str, replicas: int) -> None:
    if mode not in ("closed", "local"):
        raise ValueError(f"mode must be 'closed' or 'local', got {mode!r}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas!r}")


def local_share(limit: float, replicas: int) -> float:
    """One replica's part of a count limit while Redis is down (``local``): rounded down,
    but at least 1 where the limit is (a ``max_running = 1`` client runs one job per
    replica rather than none); 0 stays 0, unlimited stays unlimited."""
    if math.isinf(limit) or limit < 1:
        return limit if math.isinf(limit) else 0
    return max(1, math.floor(limit / replicas))


class CircuitBreaker:
    """Closed (calls go to Redis) until a failure; then open for ``retry_s``; then one
    caller at a time probes, and a success closes it again. Thread-safe; time injected."""

    def __init__(self, retry_s: float = DEFAULT_RETRY_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not retry_s > 0:
            raise ValueError(f"retry_s must be positive, got {retry_s!r}")
        self.retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._retry_at = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open

    def allow(self) -> bool:
        """May this caller try Redis now? (False while open, except for one probe.)"""
        with self._lock:
            if not self._open:
                return True
            if self._probing or self._clock() < self._retry_at:
                return False
            self._probing = True
            return True

    def succeeded(self) -> bool:
        """Redis answered; True if that closed the breaker (a recovery)."""
        with self._lock:
            was_open, self._open, self._probing = self._open, False, False
            return was_open

    def failed(self) -> bool:
        """Redis did not answer; True if that opened the breaker (an outage began)."""
        with self._lock:
            was_open = self._open
            self._open, self._probing = True, False
            self._retry_at = self._clock() + self.retry_s
            return not was_open

    def abandoned(self) -> None:
        """A probe ended without a verdict (cancelled): let the next caller probe."""
        with self._lock:
            self._probing = False

    def retry_after(self) -> float:
        with self._lock:
            return max(0.0, self._retry_at - self._clock()) if self._open else 0.0
