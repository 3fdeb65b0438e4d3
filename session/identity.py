"""Who a request belongs to, as both tiers see it.

The frontend resolves an :class:`Identity` from the request (API key, session
cookie, or address); the GPU tier receives it inside the signed token and
schedules by it. Client ids are what operators see: ``key:NAME``,
``session:ID``, ``addr:ADDRESS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypedDict

Kind = Literal["key", "session", "address"]


class IdentityDict(TypedDict):
    """An :class:`Identity` as JSON (inside the signed token, and in a job's record)."""

    client_id: str
    kind: Kind
    tier: str
    address: str


def flow_of(client_id: str, kind: str, address: str) -> str:
    """Whose share a client's requests count against: an API key is its own flow; every
    anonymous client (a session or a bare address) shares its address's flow, so minting
    cookies mints no share, no queue room and no quota. The one definition of the rule
    (the frontend's in-flight caps and the GPU tier's fair queue both use it)."""
    return client_id if kind == "key" else f"addr:{address}"


@dataclass(frozen=True)
class Identity:
    client_id: str
    kind: Kind
    tier: str
    address: str

    @property
    def flow_id(self) -> str:
        return flow_of(self.client_id, self.kind, self.address)

    def to_dict(self) -> IdentityDict:
        return {"client_id": self.client_id, "kind": self.kind, "tier": self.tier, "address": self.address}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        kind = data["kind"]
        if kind not in ("key", "session", "address"):
            raise ValueError(f"unknown identity kind {kind!r}")
        return cls(
            client_id=str(data["client_id"]),
            kind=kind,
            tier=str(data["tier"]),
            address=str(data["address"]),
        )
