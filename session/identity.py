"""Who a request belongs to, as both tiers see it.

The frontend resolves an :class:`Identity` from the request (API key, session
cookie, or address); the GPU tier receives it inside the signed token and
schedules by it. Client ids are what operators see: ``key:NAME``,
``session:ID``, ``addr:ADDRESS``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Kind = Literal["key", "session", "address"]


@dataclass(frozen=True)
class Identity:
    client_id: str
    kind: Kind
    tier: str
    address: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Identity":
        kind = data["kind"]
        if kind not in ("key", "session", "address"):
            raise ValueError(f"unknown identity kind {kind!r}")
        return cls(
            client_id=str(data["client_id"]),
            kind=kind,
            tier=str(data["tier"]),
            address=str(data["address"]),
        )
