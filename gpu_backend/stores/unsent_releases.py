"""Releases the shared store (Redis) did not hear, kept until it answers again.

Why this module exists: a job that finishes while Redis is unreachable gives its slots back
in memory only (:mod:`gpu_backend.stores.resilient_store`); in Redis its leases stay until they
expire (``SPLITSPACE_LEASE_S``, 30 s). When Redis comes back with its data (it hung, or
restarted from its persistence) the client's next job then waits for a slot that nobody
holds (issue 21: 17.5-20.6 s instead of about 4 s). So each settlement Redis did not hear
is remembered here, and :class:`~gpu_backend.stores.resilient_store.ResilientStore` sends it as
soon as Redis answers again (``send_unsent``, which the GPU tier's lease thread calls every
:data:`RETRY_EVERY_S` while any wait).

Sending a release twice, or one whose lease has expired meanwhile, changes nothing: it
removes a job id from the slot sets, and job ids are never reused. Only the release is
sent again, not the usage correction of that settlement (that was counted in memory and
is not replayed: nothing is charged twice).

Bounded: at most ``limit`` releases are kept; past that the oldest is dropped, and its
lease expires by itself in Redis, as every lease did before this module.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["UnsentReleases", "RETRY_EVERY_S", "DEFAULT_LIMIT"]

RETRY_EVERY_S = 0.2
"""How often a tier with unsent releases checks whether Redis answers again (no I/O while
the circuit breaker is open; one probe when it lets one through)."""

DEFAULT_LIMIT = 10_000
"""Releases kept at most (a few hundred bytes each)."""


class UnsentReleases:
    """The ``(flow, job id)`` of each settlement Redis missed, oldest first. Thread-safe."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        self._limit = limit
        self._jobs: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str, job_id: str) -> None:
        with self._lock:
            self._jobs[(key, job_id)] = None
            while len(self._jobs) > self._limit:
                self._jobs.popitem(last=False)

    def pending(self) -> list[tuple[str, str]]:
        """A snapshot, oldest first."""
        with self._lock:
            return list(self._jobs)

    def sent(self, key: str, job_id: str) -> None:
        with self._lock:
            self._jobs.pop((key, job_id), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)
