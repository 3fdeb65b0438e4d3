"""What crosses the hop between the tiers, and its one encoder and decoder.

A call is a :class:`~shared.contract.calls.Call` (a developer's function, its inputs, files
as bytes) plus identity headers. The GPU tier answers with a stream of updates: a
:class:`Status` while the call waits or runs, a :class:`~shared.contract.calls.Partial`
for each yield of a generator, then one :class:`~shared.contract.calls.CallResult`, or an
error. On the wire each update is one JSON object (a frame of the call route,
``shared/contract/frames.py``):

- ``{"status": "queued" | "running", "position", "eta_s", "cap"}``
- ``{"status": "partial", "data"}`` and ``{"status": "done", "data", "info", "cap"}``
  (:mod:`splitspace.shared.contract.calls`)
- ``{"status": "error", "title", "message", ...}`` (``splitspace.shared.contract.errors.to_wire``)

:meth:`Status.to_wire`, the calls' own ``to_wire`` and :func:`error_to_wire` write them;
:func:`call_update_from_wire` is the only reader, and turns an error line back into the
project's own exception (``splitspace.shared.contract.errors.from_wire``). Every transport
and the GPU tier's call route go through these, so a field added here reaches the other
side, and nothing is recognised by its English message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from splitspace.shared.contract.calls import CallInfo, CallResult, Partial
from splitspace.shared.contract.errors import BackendUnavailable, SplitspaceError, from_wire, to_wire

State = Literal["queued", "running"]


@dataclass(frozen=True)
class Status:
    """Where a job stands while it is not done: its place in the fair queue and an ETA.

    ``cap`` is the client's in-flight cap as the GPU tier counts it (operators may
    change it live); the frontend uses it for its early refusals."""

    state: State
    position: int = 0
    eta_s: float = 0.0
    cap: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"status": self.state, "position": self.position, "eta_s": self.eta_s, "cap": self.cap}


CallUpdate = Status | CallResult | Partial
"""What a developer's function answers: CallResult last, Partial while a generator yields."""


def error_to_wire(exc: SplitspaceError) -> dict[str, Any]:
    """An error as the last update of a stream."""
    return {"status": "error", **to_wire(exc)}


def call_update_from_wire(doc: Any) -> CallUpdate:
    """Read one update. An error update raises its exception; anything that is not an
    update raises BackendUnavailable (the GPU tier sent something this side cannot use)."""
    if not isinstance(doc, dict):
        raise BackendUnavailable("the GPU tier sent a malformed update")
    status = doc.get("status")
    try:
        if status in ("queued", "running"):
            return Status(status, int(doc.get("position") or 0), float(doc.get("eta_s") or 0.0), _cap(doc))
        if status == "partial":
            return Partial(_payloads(doc))
        if status == "done":
            return CallResult(_payloads(doc), CallInfo.from_dict(doc.get("info")), _cap(doc))
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendUnavailable(f"the GPU tier sent a malformed {status} update") from exc
    if status == "error":
        raise from_wire(doc)
    raise BackendUnavailable(f"the GPU tier sent an update of unknown status {str(status)[:40]!r}")


def _payloads(doc: dict[str, Any]) -> list[Any]:
    data = doc.get("data")
    if not isinstance(data, list):
        raise ValueError("data is not a list")
    return data


def _cap(doc: dict[str, Any]) -> int | None:
    cap = doc.get("cap")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0 else None


def status_for_api(status: Status) -> dict[str, Any]:
    """A status update as API clients receive it, with a line for people ("position 3,
    about 2 s") beside the numbers. (Not gr.Progress: REST callers never see it, and
    tracking it costs the queue CPU.)"""
    if status.state == "queued":
        text = f"position {status.position}, about {max(1, round(status.eta_s))} s"
    else:
        text = "generating"
    return {"status": status.state, "position": status.position, "eta_s": status.eta_s, "message": text}
