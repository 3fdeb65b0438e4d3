"""A call of a developer's GPU function, as it crosses the hop, and what comes back.

The values are Gradio's own API payloads, one per input component (what Gradio's
``/call`` takes and what a component's ``postprocess`` makes), so every component a Space
uses crosses unchanged, with one difference: a file (Gradio's ``FileData``, a path on
one tier) is carried as its bytes (``{"splitspace_file": {"name", "mime_type", "b64"}}``,
written and read by :mod:`splitspace.shared.app.files`), never as a path on the other tier.

- :class:`Call`: the endpoint's API name and its input payloads. Its :meth:`Call.digest`
  binds the one-call identity token to exactly this call.
- :class:`CallResult`: the output payloads and what the call cost (:class:`CallInfo`).
- :class:`Partial`: one yield of a generator (streaming), the outputs so far.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

CALL_PATH = "/splitspace/v1/call"
"""The GPU tier's direct route for a call (``POST``, the body :meth:`Call.to_wire`; answered with NDJSON)."""
CALL_SLACK_BYTES = 64 * 1024
"""A call's body may be this much larger than its files' base64 (:func:`call_body_limit`)."""
FILE_KEY = "splitspace_file"
"""The key of a file carried as bytes in a payload."""
MAX_ENDPOINT_CHARS = 120


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def call_body_limit(max_file_bytes: int) -> int:
    """The largest body of one call: a file of ``max_file_bytes`` as base64 (4/3 of it),
    and the rest of the call's JSON. A call's files together are within the one limit."""
    return max_file_bytes * 4 // 3 + 4 + CALL_SLACK_BYTES


@dataclass(frozen=True)
class Call:
    endpoint: str
    """The event's API name, without the leading slash."""
    data: list[Any]
    """One payload per input component, files carried as bytes."""

    def digest(self) -> str:
        """What the identity token is bound to: this endpoint with exactly these inputs."""
        return hashlib.sha256(canonical_json({"endpoint": self.endpoint, "data": self.data})).hexdigest()

    def to_wire(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "data": self.data}

    @classmethod
    def from_wire(cls, doc: Any) -> Call:
        """Read a call; raises ValueError naming what is wrong."""
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
