"""The caps the frontend's door enforces: each client's ``max_running + max_queued``.

The door (``door.py``) refuses a client that already has this many requests in
flight before anything is forwarded. Anonymous sessions share their address's
cap, like at the GPU tier (``Identity.flow_id``), so minting cookies mints no
room. The cap comes from the quota file until the GPU tier reports the one in
force (with the operators' live overrides) in a status update, a result or its
health document. The lookahead (how many of a flow's requests may be at the
GPU tier at once) is at least the client's ``max_running``, so a client allowed
four at once can run four on four GPU tiers. The door also shares its places by
the client's weight (its tier's, from the quota file).

What is learned is kept while a client is active: a cap not heard again for ``idle_s``
is forgotten (the quota file's applies again until the GPU tier's next word), and at
most ``max_idle`` are kept, the least recently heard forgotten first (a
``cachetools.TTLCache``), so a flood of distinct flows costs bounded memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from splitspace.session.identity import Identity
from splitspace.shared.contract.quotas import QuotaConfig


@dataclass(frozen=True)
class DoorTerms:
    """What the door needs to know of a client (``FairDoor.join``)."""

    cap: int
    """Requests in flight at most: ``max_running + max_queued`` (or the GPU tier's word)."""
    weight: float
    """Its share of the door's places, against other clients'."""
    running: int
    """``max_running``: at least this many of its requests may be inside at once."""


class InflightCaps:
    def __init__(
        self,
        config: Callable[[], QuotaConfig],
        *,
        idle_s: float = 600.0,
        max_idle: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._learned: TTLCache[str, int] = TTLCache(maxsize=max_idle, ttl=idle_s, timer=clock)

    def __len__(self) -> int:
        """Clients whose cap is remembered (those heard from in the last ``idle_s``)."""
        self._learned.expire()
        return len(self._learned)

    def learn(self, identity: Identity, cap: object) -> None:
        """The cap the GPU tier reported for this client (it knows the operators' overrides)."""
        self.learn_all({identity.flow_id: cap})

    def learn_all(self, caps: dict[str, object]) -> None:
        """Caps of the clients with overrides, from a GPU tier's health document."""
        for flow_id, cap in caps.items():
            if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
                self._learned[flow_id] = cap

    def terms(self, identity: Identity) -> DoorTerms:
        limits = self._config().limits_for(identity.client_id, identity.tier)
        learned = self._learned.get(identity.flow_id)
        cap = limits.max_running + limits.max_queued if learned is None else learned
        return DoorTerms(cap, limits.weight, limits.max_running)
