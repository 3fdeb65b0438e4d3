"""A call of a developer's GPU function, as it crosses the hop, and what comes back.

The values are Gradio's own API payloads, one per input component (what Gradio's
``/call`` takes and what a component's ``postprocess`` makes), so every component a Space
uses crosses unchanged, with one difference: a file (Gradio's ``FileData``, a path on
one tier) is carried as its bytes (a :class:`CarriedFile` in place of the ``FileData``,
made and landed by :mod:`splitspace.shared.app.files`), never as a path on the other tier.
On the wire its bytes follow the JSON unencoded (:mod:`splitspace.shared.contract.frames`).

- :class:`Call`: the endpoint's API name and its input payloads. Its :meth:`Call.digest`
  binds the one-call identity token to exactly this call.
- :class:`CallResult`: the output payloads and what the call cost (:class:`CallInfo`).
- :class:`Partial`: one yield of a generator (streaming), the outputs so far.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

CALL_PATH = "/splitspace/v1/call"
"""The GPU tier's direct route for a call (``POST``, the body a frame of :meth:`Call.to_wire`,
``shared/contract/frames.py``; answered with a stream of frames)."""
CALL_SLACK_BYTES = 64 * 1024
"""A call's body may be this much larger than its files (:func:`call_body_limit`)."""
FILE_KEY = "splitspace_file"
"""The key of a file's reference in a frame's JSON (and of a file as base64 in :func:`payloads_to_json`)."""
MAX_ENDPOINT_CHARS = 120


@dataclass(frozen=True)
class CarriedFile:
    """A file as it crosses the hop, in a payload where Gradio had its ``FileData``: its
    name, its type and its bytes (never a path). ``sha256`` is computed when not given
    (a frame's reader gives the one it checked)."""

    name: str
    mime_type: str | None
    data: bytes = field(repr=False)
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())

    def reference(self) -> dict[str, Any]:
        """What stands for it in JSON (a call's digest, a frame's line): all but its bytes."""
        return {"name": self.name, "mime_type": self.mime_type, "size": len(self.data), "sha256": self.sha256}


def _file_reference(value: Any) -> Any:
    if isinstance(value, CarriedFile):
        return {FILE_KEY: value.reference()}
    raise TypeError(f"{type(value).__name__} is not JSON")


def canonical_json(value: Any) -> bytes:
    """One spelling of ``value``; a file as its reference (its digest binds its bytes)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_file_reference
    ).encode()


def call_body_limit(max_file_bytes: int) -> int:
    """The largest body of one call: files of ``max_file_bytes`` (a call's files together
    are within the one limit), and the rest of the frame's JSON."""
    return max_file_bytes + CALL_SLACK_BYTES


def base64_body_limit(max_file_bytes: int) -> int:
    """The largest JSON body that gives a call's files inside it as base64 (a job's, ``POST
    /v1/jobs``): files of ``max_file_bytes`` as base64 (4/3 of it), and the rest of the call."""
    return max_file_bytes * 4 // 3 + 4 + CALL_SLACK_BYTES


def payloads_to_json(value: Any) -> Any:
    """Payloads as JSON that holds its files (``{"splitspace_file": {"name", "mime_type",
    "b64"}}``): for a record kept as JSON (a job's inputs), never for the hop."""
    if isinstance(value, CarriedFile):
        b64 = base64.b64encode(value.data).decode()
        return {FILE_KEY: {"name": value.name, "mime_type": value.mime_type, "b64": b64}}
    if isinstance(value, list):
        return [payloads_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: payloads_to_json(v) for k, v in value.items()}
    return value


def payloads_from_json(value: Any) -> Any:
    """:func:`payloads_to_json` read back; ValueError for a file whose bytes are not base64."""
    if isinstance(value, list):
        return [payloads_from_json(v) for v in value]
    if isinstance(value, dict):
        carried = value.get(FILE_KEY)
        if len(value) == 1 and isinstance(carried, dict) and isinstance(carried.get("b64"), str):
            try:
                data = base64.b64decode(carried["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("a file's bytes are not base64") from None
            name, mime = carried.get("name"), carried.get("mime_type")
            return CarriedFile(
                str(name) if isinstance(name, str) and name else "file", mime if isinstance(mime, str) else None, data
            )
        return {k: payloads_from_json(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Call:
    endpoint: str
    """The event's API name, without the leading slash."""
    data: list[Any]
    """One payload per input component, each file a :class:`CarriedFile`."""

    def digest(self) -> str:
        """What the identity token is bound to: this endpoint with exactly these inputs."""
        return hashlib.sha256(canonical_json({"endpoint": self.endpoint, "data": self.data})).hexdigest()

    def to_wire(self) -> dict[str, Any]:
        """The call as a frame's document (``frames.encode`` writes it, its files after it)."""
        return {"endpoint": self.endpoint, "data": self.data}

    @classmethod
    def from_wire(cls, doc: Any) -> Call:
        """Read a call (a frame's document, ``frames.decode``); raises ValueError naming what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("the call is not a JSON object")
        endpoint, data = doc.get("endpoint"), doc.get("data")
        if not isinstance(endpoint, str) or not endpoint or len(endpoint) > MAX_ENDPOINT_CHARS:
            raise ValueError("endpoint must be an API name")
        if not isinstance(data, list):
            raise ValueError("data must be a list of input values")
        return cls(endpoint.lstrip("/"), data)


class Info:
    """An info record's one form on the wire: its fields as a JSON object, all of them required."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, doc: Any) -> Self:
        if not isinstance(doc, dict):
            raise ValueError("info is not an object")
        try:
            return cls(**{f.name: doc[f.name] for f in fields(cls)})  # type: ignore[arg-type]
        except KeyError as exc:
            raise ValueError(f"info lacks {exc.args[0]!r}") from None


@dataclass(frozen=True)
class CallInfo(Info):
    """What a call cost: where its time went, and whose it was."""

    endpoint: str
    queue_s: float
    gpu_s: float
    total_s: float
    client: str


@dataclass(frozen=True)
class CallResult:
    """The outputs of a finished call (one payload per output component), its info, the client's cap."""

    data: list[Any]
    info: CallInfo
    cap: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"status": "done", "data": self.data, "info": self.info.to_dict(), "cap": self.cap}


@dataclass(frozen=True)
class Partial:
    """One yield of a generator: the outputs so far (each yield replaces the last)."""

    data: list[Any]

    def to_wire(self) -> dict[str, Any]:
        return {"status": "partial", "data": self.data}
