"""What crosses the hop between the tiers, and its one encoder and decoder.

A call is a validated :class:`~shared.contract.schema.GenerateRequest` plus identity
headers. The GPU tier answers with a stream of updates: a :class:`Status`
while the job waits or runs, then one :class:`Result`, or an error. On the
wire each update is one JSON object (a line of the direct route, a
``generating`` value of Gradio's ``/infer``):

- ``{"status": "queued" | "running", "position", "eta_s", "cap"}``
- ``{"status": "done", "image_png_b64", "info": {...}, "cap"}`` (the built-in text-to-image)
- ``{"status": "partial", "data"}`` and ``{"status": "done", "data", "info", "cap"}`` (a developer's
  function: :mod:`splitspace.shared.contract.calls`)
- ``{"status": "error", "title", "message", ...}`` (``splitspace.shared.contract.errors.to_wire``)

:meth:`Status.to_wire`, :meth:`Result.to_wire` and :func:`error_to_wire`
write them; :func:`read_update` is the only reader (:func:`update_from_wire` and
:func:`call_update_from_wire` narrow it to one kind), and turns an error
line back into the project's own exception (``splitspace.shared.contract.errors.from_wire``).
Every transport and both GPU routes go through these, so a field added here
reaches the other side, and nothing is recognised by its English message.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Literal

from splitspace.shared.contract.calls import CallInfo, CallResult, Info, Partial
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


@dataclass(frozen=True)
class GenerateInfo(Info):
    """What a caller learns about its image besides the pixels: what ran, and how long it took.

    ``steps``, ``guidance_scale`` and ``seed`` are the values the model was called with
    (decided once, at admission); ``model`` is the model that made the image."""

    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    model: str
    queue_s: float
    gpu_s: float
    total_s: float
    client: str


@dataclass(frozen=True)
class Result:
    """The finished image (PNG bytes), its info, and the client's cap."""

    image_png: bytes
    info: GenerateInfo
    cap: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": "done",
            "image_png_b64": base64.b64encode(self.image_png).decode("ascii"),
            "info": self.info.to_dict(),
            "cap": self.cap,
        }


Update = Status | Result
"""What the built-in text-to-image answers."""
CallUpdate = Status | CallResult | Partial
"""What a developer's function answers: CallResult last, Partial while a generator yields."""


def error_to_wire(exc: SplitspaceError) -> dict[str, Any]:
    """An error as the last update of a stream."""
    return {"status": "error", **to_wire(exc)}


def read_update(doc: Any) -> Status | Result | CallResult | Partial:
    """Read one update of either kind. An error update raises its exception; anything that
    is not an update raises BackendUnavailable (the GPU tier sent something this side cannot use)."""
    if not isinstance(doc, dict):
        raise BackendUnavailable("the GPU tier sent a malformed update")
    status = doc.get("status")
    try:
        if status in ("queued", "running"):
            return Status(status, int(doc.get("position") or 0), float(doc.get("eta_s") or 0.0), _cap(doc))
        if status == "partial":
            return Partial(_payloads(doc))
        if status == "done" and "data" in doc:
            return CallResult(_payloads(doc), CallInfo.from_dict(doc.get("info")), _cap(doc))
        if status == "done":
            png = base64.b64decode(doc["image_png_b64"], validate=True)
            return Result(png, GenerateInfo.from_dict(doc.get("info")), _cap(doc))
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BackendUnavailable(f"the GPU tier sent a malformed {status} update") from exc
    if status == "error":
        raise from_wire(doc)
    raise BackendUnavailable(f"the GPU tier sent an update of unknown status {str(status)[:40]!r}")


def update_from_wire(doc: Any) -> Update:
    """Read one update of the built-in text-to-image (:func:`read_update`, narrowed)."""
    update = read_update(doc)
    if isinstance(update, Status | Result):
        return update
    raise BackendUnavailable("the GPU tier sent a function's output where an image was expected")


def call_update_from_wire(doc: Any) -> CallUpdate:
    """Read one update of a developer's function (:func:`read_update`, narrowed)."""
    update = read_update(doc)
    if isinstance(update, Result):
        raise BackendUnavailable("the GPU tier sent an image where a function's output was expected")
    return update


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
