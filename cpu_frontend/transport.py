"""The CPU-to-GPU hop: one small interface, several transports.

A transport streams one call to the GPU tier: a validated
:class:`~shared.schema.GenerateRequest` and the call's identity headers in,
every :class:`~shared.hop.Status` the GPU tier sends (queue position, ETA) as
it arrives out, then the :class:`~shared.hop.Result`. Library errors are
mapped to the project's own at this boundary (``BackendUnavailable``,
``Throttled``, ``Unauthorized``, ``SplitspaceError``), in the manner of
httpx's ``map_httpcore_exceptions``; updates are read with
:func:`shared.hop.update_from_wire` only, so no Gradio or HTTP type and no
English message crosses it.

``transports`` of the package: ``direct`` (the default), ``httpx`` (Gradio's
queue protocol), ``gradio_client`` (the stock client) and ``MockTransport``
(in-process, for tests and for trying the frontend without a GPU tier).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from shared.errors import BackendUnavailable
from shared.hop import Update
from shared.schema import GenerateRequest


class NotStarted(Exception):
    """Raised by a transport when a call failed before the GPU tier accepted it (safe to retry)."""


class Transport(ABC):
    """Streams calls to one GPU tier."""

    base_url: str

    @abstractmethod
    def stream(self, request: GenerateRequest, headers: Mapping[str, str]) -> AsyncIterator[Update]:
        """Yield each Status of the call, then its Result. Closing the iterator early
        cancels the call on the GPU tier."""

    @abstractmethod
    async def standing(self, headers: Mapping[str, str]) -> dict[str, Any]:
        """The caller's quota standing as the GPU tier counts it."""

    @abstractmethod
    async def health(self, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The GPU tier's /health document; raises BackendUnavailable."""

    async def aclose(self) -> None:
        return None


async def fetch_health(
    client: httpx.AsyncClient, base_url: str, headers: Mapping[str, str] | None
) -> dict[str, Any]:
    """GET a GPU tier's /health with ``client``; BackendUnavailable when it does not answer."""
    try:
        r = await client.get(f"{base_url}/health", headers=dict(headers or {}))
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise BackendUnavailable(f"{base_url} did not answer its health check") from exc
