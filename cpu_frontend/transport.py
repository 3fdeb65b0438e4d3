"""The CPU-to-GPU hop: one small interface, several transports.

A transport streams one call to the GPU tier: every status update the GPU
tier yields (queue position, ETA) as it arrives, then the final result.
Library errors are mapped to the project's own at this boundary
(``BackendUnavailable``, ``Throttled``, ``Unauthorized``, ``SplitspaceError``),
in the manner of httpx's ``map_httpcore_exceptions``; no Gradio or httpx type
crosses it.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import httpx

from shared.errors import (
    BackendUnavailable,
    QUEUE_FULL,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    SplitspaceError,
    Throttled,
    Unauthorized,
    UNAUTHORIZED,
    ValidationFailed,
    INVALID_REQUEST,
)

_RETRY_RE = re.compile(r"^(?P<reason>.*)\. Retry in (?P<secs>\d+) s\.$", re.S)


class NotStarted(Exception):
    """Raised by a transport when a call failed before the GPU tier accepted it (safe to retry)."""


class Transport(ABC):
    """Streams calls to one GPU tier."""

    base_url: str

    @abstractmethod
    def stream(
        self, api_name: str, data: list[Any], headers: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield each update of the call; the last one is the result. Closing the
        iterator early cancels the call on the GPU tier."""

    @abstractmethod
    async def health(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """The GPU tier's /health document; raises BackendUnavailable."""

    async def aclose(self) -> None:
        return None


async def fetch_health(
    client: httpx.AsyncClient, base_url: str, headers: dict[str, str] | None
) -> dict[str, Any]:
    """GET a GPU tier's /health with ``client``; BackendUnavailable when it does not answer."""
    try:
        r = await client.get(f"{base_url}/health", headers=headers)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise BackendUnavailable(f"{base_url} did not answer its health check") from exc


def error_from_backend(text: str | None) -> SplitspaceError:
    """Rebuild the project's error from the text the GPU tier sent ("Title: message")."""
    text = (text or "").strip() or "the GPU tier failed without a message"
    title, sep, message = text.partition(": ")
    if not sep:
        return SplitspaceError(text, title="GPU error")
    if title in (QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED):
        m = _RETRY_RE.match(message)
        if m:
            return Throttled(title, m.group("reason"), float(m.group("secs")))
    if title == UNAUTHORIZED:
        return Unauthorized(message)
    if title == INVALID_REQUEST:
        field, _, rest = message.partition(": ")
        return ValidationFailed(field, rest)
    return SplitspaceError(message, title=title)
