"""The CPU-to-GPU hop: one small interface, two transports.

A transport carries a call of a developer's ``@splitspace.gpu`` function
(:class:`~shared.contract.calls.Call`) and the call's identity headers to the GPU tier
(:meth:`Transport.call`): every :class:`~shared.contract.hop.Status` the GPU tier sends
(queue position, ETA) as it arrives, then the :class:`~shared.contract.calls.CallResult`,
read with :func:`~shared.contract.hop.call_update_from_wire`. Library errors are mapped
to the project's own at this boundary (``BackendUnavailable``, ``Throttled``,
``Unauthorized``, ``SplitspaceError``), in the manner of httpx's ``map_httpcore_exceptions``,
so no HTTP type and no English message crosses it.

The package's transports: ``DirectTransport`` (``direct_transport.py``: every call of a
deployment) and ``MockTransport`` (``mock_transport.py``: in process, for tests and for
trying the frontend without a GPU tier).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from splitspace.shared.contract.calls import Call
from splitspace.shared.contract.hop import CallUpdate


class NotStarted(Exception):
    """Raised by a transport when a call failed before the GPU tier accepted it (safe to retry)."""


class Transport(ABC):
    """Carries calls to one GPU tier."""

    base_url: str

    @abstractmethod
    def call(self, call: Call, headers: Mapping[str, str]) -> AsyncGenerator[CallUpdate, None]:
        """Yield each Status of a call of a developer's function, then its CallResult.
        Closing the iterator early cancels the call on the GPU tier."""

    @abstractmethod
    async def standing(self, headers: Mapping[str, str]) -> dict[str, Any]:
        """The caller's quota standing as the GPU tier counts it."""

    @abstractmethod
    async def health(self, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The GPU tier's /health document; raises BackendUnavailable."""

    async def aclose(self) -> None:
        return None
