"""The frontend's early per-client cap on requests in flight.

No first-in-first-out stage may hold one client behind another's backlog,
so the forwarding handler admits many requests at once; this cap refuses a
client that already has ``max_running + max_queued`` requests in flight
before anything is forwarded. Anonymous sessions share their address's cap,
like at the GPU tier, so minting cookies mints no room. The cap comes from the
quota file until the GPU tier reports the one in force (with the operators'
live overrides) in a status update or result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from session.identity import Identity
from shared.errors import QUEUE_FULL, Throttled
from shared.quotas import QuotaConfig


class InflightCaps:
    def __init__(self, config: Callable[[], QuotaConfig]) -> None:
        self._config = config
        self._inflight: Counter[str] = Counter()
        self._learned: dict[str, int] = {}

    def learn(self, identity: Identity, cap: object) -> None:
        """The cap the GPU tier reported for this client (it knows the operators' overrides)."""
        self.learn_all({identity.flow_id: cap})

    def learn_all(self, caps: dict[str, object]) -> None:
        """Caps of the clients with overrides, from a GPU tier's health document."""
        for subject, cap in caps.items():
            if isinstance(cap, int) and cap >= 0:
                self._learned[subject] = cap

    def cap(self, identity: Identity) -> int:
        learned = self._learned.get(identity.flow_id)
        if learned is not None:
            return learned
        limits = self._config().limits_for(identity.client_id, identity.tier)
        return limits.max_running + limits.max_queued

    def count(self, identity: Identity) -> int:
        return self._inflight[identity.flow_id]

    @contextmanager
    def hold(self, identity: Identity) -> Iterator[None]:
        subject = identity.flow_id
        cap = self.cap(identity)
        if self._inflight[subject] >= cap:
            raise Throttled(
                QUEUE_FULL,
                f"{self._inflight[subject]} requests already in flight "
                f"(max_running + max_queued = {cap})",
                1.0,
            )
        self._inflight[subject] += 1
        try:
            yield
        finally:
            self._inflight[subject] -= 1
            if not self._inflight[subject]:
                del self._inflight[subject]
