"""What a job can run: the small interface the job runner needs, and the app's GPU functions as one.

Why it exists: the runner (``runner.py``) keeps jobs, places and webhooks; what a job *is*
is a call of one of the served app's ``@splitspace.gpu`` functions (with no
``SPLITSPACE_APP``, the built-in text-to-image app's ``generate``, served as any app is).
A :class:`JobTarget` turns a job's inputs into a
:class:`~splitspace.shared.contract.calls.Call` (or raises ``ValidationFailed`` naming
the input), and runs one for an identity, streaming
:class:`~splitspace.shared.contract.hop.Status` updates and then one :class:`Finished`.
:class:`FunctionTarget` goes through the Frontend's own Gradio-free pieces, as the Gradio
API path of the same function does (``FrontendCore.follow_call``): the identity tokens,
the app path's validation, the backend pool's ``call``, the learned caps and ETA.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from splitspace.cpu_frontend.api.input_names import Function, describe
from splitspace.cpu_frontend.api.validation import InputRefused
from splitspace.cpu_frontend.core import checked_call
from splitspace.cpu_frontend.jobs.file_inputs import land_files
from splitspace.cpu_frontend.jobs.records import FILE_REF, StoredFile
from splitspace.session.identity import Identity
from splitspace.session.token import call_purpose
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.contract.calls import Call, CallResult, CarriedFile
from splitspace.shared.contract.errors import BackendUnavailable, ValidationFailed
from splitspace.shared.contract.headers import IDENTITY_HEADER
from splitspace.shared.contract.hop import CallUpdate, Status
from splitspace.shared.contract.schema import echo


@dataclass(frozen=True)
class Finished:
    """A job's outputs (one payload per output; a file as ``{"$file": INDEX, "name",
    "mime_type", "size"}``) and the files they refer to."""

    outputs: list[Any]
    files: list[StoredFile]


JobUpdate = Status | Finished


class JobTarget(Protocol):
    def validate(self, endpoint: str, inputs: Mapping[str, Any] | None, data: list[Any] | None) -> Call:
        """The call these inputs (by name, or positional) make; ValidationFailed naming the input."""

    def run(self, identity: Identity, call: Call) -> AsyncGenerator[JobUpdate, None]:
        """Status updates, then one Finished; the project's errors raise. Closing it early
        cancels the call on the GPU tier."""


class Tokens(Protocol):
    def mint(self, identity: Identity, purpose: str) -> str: ...


class Caller(Protocol):
    def call(self, call: Call, headers: Mapping[str, str]) -> AsyncGenerator[CallUpdate, None]: ...


def file_ref(index: int, f: StoredFile) -> dict[str, Any]:
    """How a stored output refers to its file (``views.py`` shows it as a URL)."""
    return {FILE_REF: index, "name": f.name, "mime_type": f.mime_type, "size": len(f.data)}


def _positional(
    names: Sequence[str], inputs: Mapping[str, Any] | None, data: list[Any] | None, defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Inputs by name, from either form; ValidationFailed naming an unknown or missing one."""
    if inputs is not None and data is not None:
        raise ValidationFailed("inputs", "give either inputs (by name) or data (a list), not both")
    if data is not None:
        if len(data) > len(names):
            raise ValidationFailed("data", f"takes at most {len(names)} values ({', '.join(names)}), got {len(data)}")
        values = dict(zip(names, data, strict=False))
    else:
        values = dict(inputs or {})
        for name in values:
            if name not in names:
                shown = name if len(name) <= 40 else name[:37] + "..."
                raise ValidationFailed(shown, f"is not an input of this endpoint (its inputs: {', '.join(names)})")
    for name in names:
        if name not in values:
            if name not in defaults:
                raise ValidationFailed(name, "is required")
            values[name] = defaults[name]
    return values


def collect_files(value: Any, files: list[StoredFile]) -> Any:
    """Outputs with each carried file (a CarriedFile) moved into ``files``."""
    if isinstance(value, CarriedFile):
        f = StoredFile(value.name, value.mime_type or "application/octet-stream", value.data)
        files.append(f)
        return file_ref(len(files) - 1, f)
    if isinstance(value, list):
        return [collect_files(v, files) for v in value]
    if isinstance(value, dict):
        return {k: collect_files(v, files) for k, v in value.items()}
    return value


class FunctionTarget:
    """The served app's ``@splitspace.gpu`` functions (the built-in's ``generate`` too), over
    the backend pool's ``call``. A job's inputs are checked by the Gradio API path's one
    validation (``validate_call``'s rules: ``cpu_frontend/api/validation.py``), its files
    landed for it first (``file_inputs.py``). ``on_gpu_s``: each finished call's measured
    GPU seconds (the ETA of those waiting at the door: ``FrontendCore.learn_gpu_s``)."""

    def __init__(
        self,
        endpoints: Sequence[GpuEndpoint],
        pool: Caller,
        tokens: Tokens,
        *,
        max_file_bytes: int,
        cache_dir: str,
        learn_cap: Callable[[Identity, int | None], None] = lambda identity, cap: None,
        on_gpu_s: Callable[[float], None] = lambda s: None,
    ) -> None:
        self.endpoints_by_name = {e.api_name: e for e in endpoints}
        self.functions = {e.api_name: describe(e) for e in endpoints}
        self.pool = pool
        self.tokens = tokens
        self.max_file_bytes = max_file_bytes
        self.cache_dir = cache_dir
        self.learn_cap = learn_cap
        self.on_gpu_s = on_gpu_s

    def validate(self, endpoint: str, inputs: Mapping[str, Any] | None, data: list[Any] | None) -> Call:
        """Blocking (files written, the event's validator run): call it off the event loop.
        The checks are the Gradio API path's (``FrontendCore.check_call``); a refused input
        is named as in ``inputs``, the message names it by its label, as Gradio's does."""
        f, gpu = self._function(endpoint), self.endpoints_by_name[endpoint]
        values = _positional(f.inputs, inputs, data, f.defaults)
        Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="job-inputs-", dir=self.cache_dir) as folder:
            payloads = [
                land_files(component, values[name], Path(folder), name)
                for component, name in zip(gpu.inputs, f.inputs, strict=True)
            ]
            try:
                return checked_call(gpu, payloads, self.max_file_bytes).call
            except InputRefused as refused:
                if refused.position is None:
                    raise
                raise ValidationFailed(f.inputs[refused.position - 1], refused.message) from None

    def _function(self, endpoint: str) -> Function:
        f = self.functions.get(endpoint)
        if f is None:
            known = ", ".join(f"/{n}" for n in self.functions) or "none"
            raise ValidationFailed("endpoint", f"no endpoint {echo('/' + endpoint)} (this deployment's: {known})")
        return f

    async def run(self, identity: Identity, call: Call) -> AsyncGenerator[JobUpdate, None]:
        headers = {IDENTITY_HEADER: self.tokens.mint(identity, call_purpose(call.digest()))}
        async for update in self.pool.call(call, headers):
            if isinstance(update, Status):
                self.learn_cap(identity, update.cap)
                yield update
            elif isinstance(update, CallResult):
                self.learn_cap(identity, update.cap)
                self.on_gpu_s(update.info.gpu_s)
                files: list[StoredFile] = []
                yield Finished(collect_files(update.data, files), files)
                return
            # (a Partial, a generator's output so far: a job keeps only the last)
        raise BackendUnavailable("the GPU tier ended the call without a result")
