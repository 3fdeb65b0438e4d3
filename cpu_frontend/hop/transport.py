"""The CPU-to-GPU hop: one small interface, several transports.

A transport streams one call to the GPU tier: a validated
:class:`~shared.contract.schema.GenerateRequest` and the call's identity headers in,
every :class:`~shared.contract.hop.Status` the GPU tier sends (queue position, ETA) as
it arrives out, then the :class:`~shared.contract.hop.Result`. Library errors are
mapped to the project's own at this boundary (``BackendUnavailable``,
``Throttled``, ``Unauthorized``, ``SplitspaceError``), in the manner of
httpx's ``map_httpcore_exceptions``; updates are read with
:func:`splitspace.shared.contract.hop.update_from_wire` only, so no Gradio or HTTP type and no
English message crosses it.

A call of one of a developer's ``@splitspace.gpu`` functions (:class:`~shared.contract.calls.Call`)
goes the same way through :meth:`Transport.call`: its Status updates, then its
:class:`~shared.contract.calls.CallResult`, read with :func:`~shared.contract.hop.call_update_from_wire`.

``transports`` of the package: ``direct`` (the default), ``httpx`` (Gradio's
queue protocol), ``gradio_client`` (the stock client) and ``MockTransport``
(in-process, for tests and for trying the frontend without a GPU tier). Only ``direct``
and ``MockTransport`` carry calls of a developer's functions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx

from splitspace.shared.contract.calls import Call
from splitspace.shared.contract.errors import BackendUnavailable
from splitspace.shared.contract.hop import CallUpdate, Update, update_from_wire
from splitspace.shared.contract.schema import GenerateRequest

CALLS_NEED_DIRECT = "the developer's functions (SPLITSPACE_APP) need SPLITSPACE_TRANSPORT=direct"


class NotStarted(Exception):
    """Raised by a transport when a call failed before the GPU tier accepted it (safe to retry)."""


class Transport(ABC):
    """Streams calls to one GPU tier."""

    base_url: str

    @abstractmethod
    def stream(self, request: GenerateRequest, headers: Mapping[str, str]) -> AsyncGenerator[Update, None]:
        """Yield each Status of the call, then its Result. Closing the iterator early
        cancels the call on the GPU tier."""

    carries_calls = False
    """Whether :meth:`call` works (the frontend checks it at start when it serves an app)."""

    def call(self, call: Call, headers: Mapping[str, str]) -> AsyncGenerator[CallUpdate, None]:
        """Yield each Status of a call of a developer's function, then its CallResult.
        Closing the iterator early cancels the call on the GPU tier."""
        raise NotImplementedError(CALLS_NEED_DIRECT)

    @abstractmethod
    async def standing(self, headers: Mapping[str, str]) -> dict[str, Any]:
        """The caller's quota standing as the GPU tier counts it."""

    @abstractmethod
    async def health(self, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The GPU tier's /health document; raises BackendUnavailable."""

    async def aclose(self) -> None:
        return None


class GradioEndpointTransport(Transport):
    """A transport to the GPU tier's Gradio endpoints ``/infer`` and ``/standing``, whose
    every yielded value is a hop document (``shared/contract/hop.py``). Subclasses say how one
    Gradio call is made (:meth:`_call`); reading its values is the same for all."""

    @abstractmethod
    def _call(self, api_name: str, data: list[Any], headers: Mapping[str, str]) -> AsyncGenerator[Any, None]:
        """Each value the endpoint yields, in order (an error as its last value)."""

    async def stream(self, request: GenerateRequest, headers: Mapping[str, str]) -> AsyncGenerator[Update, None]:
        docs = self._call("infer", request.as_args(), headers)
        try:
            async for doc in docs:
                yield update_from_wire(doc)  # the Result last; an error value raises its error
        finally:
            await docs.aclose()

    async def standing(self, headers: Mapping[str, str]) -> dict[str, Any]:
        result: Any = None
        docs = self._call("standing", [], headers)
        try:
            async for doc in docs:
                result = doc
        finally:
            await docs.aclose()
        if isinstance(result, dict) and result.get("status") == "error":
            update_from_wire(result)  # raises its error
        if not isinstance(result, dict):
            raise BackendUnavailable("the GPU tier sent no standing")
        return result


async def fetch_health(client: httpx.AsyncClient, base_url: str, headers: Mapping[str, str] | None) -> dict[str, Any]:
    """GET a GPU tier's /health with ``client``; BackendUnavailable when it does not answer."""
    try:
        r = await client.get(f"{base_url}/health", headers=dict(headers or {}))
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise BackendUnavailable(f"{base_url} did not answer its health check") from exc
