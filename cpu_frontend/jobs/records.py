"""What a durable job is, in the store and on the wire: one definition for both stores.

A :class:`Job` is a request that waits without a connection: its inputs (already
validated into a :class:`~splitspace.shared.contract.calls.Call`'s positional data), its
owner's identity, where it stands, and, once it has ended, its outputs or error. Files of
the outputs are kept beside it as :class:`StoredFile` (an output refers to one by index),
webhook attempts as :class:`Attempt`, pending webhook deliveries as :class:`Delivery`.
Every record is a plain dataclass with ``to_dict``/``from_dict`` (JSON), written by both
stores alike.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from splitspace.session.identity import Identity

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
OPEN: frozenset[str] = frozenset({"queued", "running"})
ENDED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EVENTS = ("started", "completed", "failed", "cancelled")
"""Webhook events a job can announce (``job.<event>``)."""
DEFAULT_EVENTS = ("completed", "failed", "cancelled")
FILE_REF = "$file"
"""The key of a stored output's reference to one of its job's files (by index)."""
EVENT_OF_STATUS = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}


def new_id(prefix: str, now: float | None = None) -> str:
    """``prefix`` + the time in ms (12 hex digits) + 64 random bits: ids sort by creation."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{prefix}{ms:012x}{secrets.token_hex(8)}"


@dataclass(frozen=True)
class Webhook:
    url: str
    events: tuple[str, ...] = DEFAULT_EVENTS


@dataclass
class Job:
    id: str
    owner: str
    """The client id that sees and cancels it (``key:NAME``, ``session:ID``, ``addr:ADDRESS``)."""
    identity: Identity
    endpoint: str
    """The API name, without the leading slash."""
    data: list[Any]
    """The validated inputs, positional (a Call's data)."""
    created_at: float
    status: JobStatus = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    position: int | None = None
    eta_s: float | None = None
    outputs: list[Any] | None = None
    """One payload per output; a file is ``{"$file": INDEX, "name", "mime_type", "size"}``."""
    error: dict[str, Any] | None = None
    webhook: Webhook | None = None
    idempotency_key: str | None = None
    fingerprint: str = ""
    """sha256 of what was asked (endpoint, inputs, webhook): a retried Idempotency-Key must match."""
    base_url: str = ""
    """The frontend's URL as its caller reached it (the links in its webhooks)."""

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["identity"] = self.identity.to_dict()
        doc["webhook"] = (
            None if self.webhook is None else {"url": self.webhook.url, "events": list(self.webhook.events)}
        )
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["identity"] = Identity.from_dict(doc["identity"])
        hook = doc.get("webhook")
        values["webhook"] = None if not hook else Webhook(hook["url"], tuple(hook["events"]))
        return cls(**values)

    def copy(self, **changes: Any) -> Job:
        return replace(self, **changes)


@dataclass(frozen=True)
class StoredFile:
    name: str
    mime_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Attempt:
    """One webhook delivery attempt, as the job's ``webhook_attempts`` show it."""

    webhook_id: str
    event: str
    attempt: int
    at: float
    ok: bool
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: float | None = None
    """None after a success, or when the last attempt failed (given up)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Attempt:
        values: dict[str, Any] = {f.name: doc.get(f.name) for f in fields(cls)}
        return cls(**values)


@dataclass(frozen=True)
class Delivery:
    """A webhook message still to deliver: the same ``id`` (``webhook-id``) and body on every attempt."""

    id: str
    job_id: str
    owner: str
    url: str
    event: str
    body: str
    attempts: int = 0
    next_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Delivery:
        return cls(**{f.name: doc[f.name] for f in fields(cls)})
