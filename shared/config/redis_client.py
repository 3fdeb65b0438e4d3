"""How every tier builds its Redis client, and which Redis errors mean "unreachable".

Why it exists: one set of timeouts and retries for all Redis users (the GPU tier's
stores in ``gpu_backend/stores/redis_store.py``, the frontend's in-flight ledger in
``cpu_frontend/door/inflight_ledger.py``), importable without the GPU tier. A sick Redis costs
a call at most about two ``timeout_s``: a short connect and read timeout, one immediate
reconnect (a pooled connection a Redis restart closed), no backoff, nothing on timeouts
(redis-py's default is ten retries with backoff).

The URL usually carries the password: it goes to redis-py and nowhere else;
:func:`unreachable_reason` keeps only an error's type and first line (redis-py's
messages name host and port, never the password).
"""

from __future__ import annotations

from typing import TypedDict

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT_S",
    "UNAVAILABLE_ERRORS",
    "client_options",
    "sync_client",
    "async_client",
    "unreachable_reason",
]

DEFAULT_PREFIX = "splitspace:"
"""Every key of a deployment starts with this (one Redis can host several deployments)."""
DEFAULT_TIMEOUT_S = 0.5
"""Socket connect and read timeout: a sick Redis costs a caller at most about this."""

UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # also authentication, loading, too many connections
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a failover made our primary a replica
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    OSError,
)
"""Errors that mean "Redis cannot serve now", not "this call is wrong"."""


class ClientOptions(TypedDict):
    """The keyword arguments of ``redis.Redis.from_url`` this module sets."""

    decode_responses: bool
    socket_timeout: float
    socket_connect_timeout: float
    retry: Retry | redis.asyncio.retry.Retry
    health_check_interval: int


def client_options(timeout_s: float = DEFAULT_TIMEOUT_S) -> ClientOptions:
    """The keyword arguments of a blocking ``redis.Redis`` (see the module docstring)."""
    return {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        "health_check_interval": 0,
    }


def sync_client(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
    """A blocking client for ``url`` (``redis://``, ``rediss://``, ``unix://``); connects lazily."""
    return redis.Redis.from_url(url, **client_options(timeout_s))


def async_client(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.asyncio.Redis:
    """The ``redis.asyncio`` twin of :func:`sync_client`; connects lazily."""
    options = client_options(timeout_s)
    options["retry"] = redis.asyncio.retry.Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    return redis.asyncio.Redis.from_url(url, **options)


def unreachable_reason(exc: BaseException) -> str:
    """A message for an :data:`UNAVAILABLE_ERRORS` error: its type and first line only."""
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return f"the shared store (Redis) is unreachable: {type(exc).__name__} {detail}".strip()
