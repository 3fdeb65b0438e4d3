"""Error titles and exception types of the public contract.

Both tiers raise these; the Gradio apps turn them into ``gr.Error`` at their
edge (see :func:`to_gradio_error` in each app). The message always carries the
title too, because REST callers receive only the message.
"""

from __future__ import annotations

import math

RATE_LIMITED = "Rate limited"
QUOTA_EXCEEDED = "Quota exceeded"
QUEUE_FULL = "Queue full"
BACKEND_UNAVAILABLE = "GPU backend unavailable"
INVALID_REQUEST = "Invalid request"
UNAUTHORIZED = "Unauthorized"
GPU_ERROR = "GPU error"
NOT_FOUND = "Not found"
TIME_LIMIT = "Time limit"


class SplitspaceError(Exception):
    """Base class: a user-facing error with a title and a message."""

    title: str = "Error"

    def __init__(self, message: str, *, title: str | None = None) -> None:
        super().__init__(message)
        if title is not None:
            self.title = title

    @property
    def message(self) -> str:
        return str(self.args[0])

    def user_text(self) -> str:
        """The text shown to REST callers: title and message together."""
        return f"{self.title}: {self.message}"


class ValidationFailed(SplitspaceError):
    """A request field is outside its allowed values."""

    title = INVALID_REQUEST

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Unauthorized(SplitspaceError):
    """Missing, forged or expired credentials (token, API key, admin token)."""

    title = UNAUTHORIZED


class Throttled(SplitspaceError):
    """A per-client limit refused the request; retry after ``retry_after_s``."""

    def __init__(self, title: str, reason: str, retry_after_s: float) -> None:
        self.reason = reason
        self.retry_after_s = max(0.0, float(retry_after_s))
        secs = max(1, math.ceil(self.retry_after_s))
        super().__init__(f"{reason}. Retry in {secs} s.", title=title)

    @property
    def retry_after_whole_s(self) -> int:
        return max(1, math.ceil(self.retry_after_s))


class BackendUnavailable(SplitspaceError):
    """The GPU tier could not be reached or did not answer in time."""

    title = BACKEND_UNAVAILABLE


class UnknownEndpoint(SplitspaceError):
    """A call names a function the GPU tier does not serve (the message names it)."""

    title = NOT_FOUND


class GpuFailed(SplitspaceError):
    """The model failed on the GPU tier (the message names the exception type, no internals)."""

    title = GPU_ERROR


class TimeLimitExceeded(SplitspaceError):
    """A developer's function ran past its time limit (``@splitspace.gpu(time_limit=...)``, or
    its event's ``time_limit``) and was stopped; the message names the limit."""

    title = TIME_LIMIT

    @classmethod
    def after(cls, limit_s: float) -> TimeLimitExceeded:
        return cls(f"the function ran past its time limit of {limit_s:g} s and was stopped")


def to_wire(exc: SplitspaceError) -> dict[str, object]:
    """The error as JSON for the direct GPU route: title, message, and the field or
    retry seconds that clients act on. The inverse of :func:`from_wire`."""
    doc: dict[str, object] = {"title": exc.title, "message": exc.message}
    if isinstance(exc, (Throttled, ServiceUnavailable)):
        doc["message"] = exc.reason
        doc["retry_after_s"] = round(exc.retry_after_s, 3)
    elif isinstance(exc, ValidationFailed):
        doc["field"] = exc.field
        doc["message"] = exc.message.partition(": ")[2]
    return doc


def from_wire(doc: dict[str, object]) -> SplitspaceError:
    """Rebuild the error a GPU tier sent with :func:`to_wire`."""
    title = str(doc.get("title") or GPU_ERROR)
    message = str(doc.get("message") or "the GPU tier failed without a message")
    if title in (QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED) and "retry_after_s" in doc:
        return Throttled(title, message, float(doc["retry_after_s"]))  # type: ignore[arg-type]
    if title == UNAUTHORIZED:
        return Unauthorized(message)
    if title == INVALID_REQUEST and "field" in doc:
        return ValidationFailed(str(doc["field"]), message)
    if title == BACKEND_UNAVAILABLE:
        return BackendUnavailable(message)
    if title == GPU_ERROR:
        return GpuFailed(message)
    if title == NOT_FOUND:
        return UnknownEndpoint(message)
    if title == TIME_LIMIT:
        return TimeLimitExceeded(message)
    if title == SERVICE_UNAVAILABLE and "retry_after_s" in doc:
        return ServiceUnavailable(message, float(doc["retry_after_s"]))  # type: ignore[arg-type]
    return SplitspaceError(message, title=title)


SERVICE_UNAVAILABLE = "Service unavailable"


class ServiceUnavailable(SplitspaceError):
    """A dependency the tier needs (its shared store, e.g. Redis) is down; retry after
    ``retry_after_s``. Unlike :class:`Throttled` this is nobody's limit: nothing was charged."""

    title = SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after_s: float) -> None:
        self.reason = message
        self.retry_after_s = max(0.0, float(retry_after_s))
        super().__init__(f"{message}. Retry in {self.retry_after_whole_s} s.")

    @property
    def retry_after_whole_s(self) -> int:
        return max(1, math.ceil(self.retry_after_s))
