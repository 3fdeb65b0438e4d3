"""The caps the frontend's door enforces: each client's ``max_running + max_queued``.

The door (``door.py``) refuses a client that already has this many requests in
flight before anything is forwarded. Anonymous sessions share their address's
cap, like at the GPU tier (``Identity.flow_id``), so minting cookies mints no
room. The cap comes from the quota file until the GPU tier reports the one in
force (with the operators' live overrides) in a status update, a result or its
health document. The lookahead (how many of a flow's requests may be at the
GPU tier at once) follows the client's ``max_running``. The door also shares its
places by the client's weight (its tier's, from the quota file).
"""

from __future__ import annotations

from collections.abc import Callable

from session.identity import Identity
from shared.quotas import QuotaConfig


class InflightCaps:
    def __init__(self, config: Callable[[], QuotaConfig]) -> None:
        self._config = config
        self._learned: dict[str, int] = {}

    def learn(self, identity: Identity, cap: object) -> None:
        """The cap the GPU tier reported for this client (it knows the operators' overrides)."""
        self.learn_all({identity.flow_id: cap})

    def learn_all(self, caps: dict[str, object]) -> None:
        """Caps of the clients with overrides, from a GPU tier's health document."""
        for flow_id, cap in caps.items():
            if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
                self._learned[flow_id] = cap

    def cap_and_weight(self, identity: Identity) -> tuple[int, float]:
        """The client's in-flight cap, and its weight at the door."""
        limits = self._config().limits_for(identity.client_id, identity.tier)
        learned = self._learned.get(identity.flow_id)
        return (limits.max_running + limits.max_queued if learned is None else learned), limits.weight
