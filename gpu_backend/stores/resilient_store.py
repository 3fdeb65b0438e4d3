"""What a tier does while its shared store (Redis) is down: ``SPLITSPACE_REDIS_FAILURE``.

Why this module exists: a shared store is a new way to fail. Envoy's rate limiter fails
open by default and LiteLLM silently falls back to per-pod limits (litellm#35533), so an
outage multiplies every limit without anyone noticing. Here the choice is explicit, and
both choices are bounded in time and in what they let through:

``closed`` (the default)
    Admission (``admit``, ``start_job``) raises
    :class:`~gpu_backend.stores.usage.StoreUnavailable`, a ``ServiceUnavailable`` ("Service
    unavailable", with the seconds until Redis is tried again). Nothing is admitted that
    the global limits have not checked.
``local``
    Admission is decided by an in-process :class:`~gpu_backend.stores.usage.MemoryUsageStore`
    with every limit divided by the number of replicas (``replicas``), so that the sum
    over all replicas still holds: ``gpu_seconds`` exactly, counts (``max_queued``,
    ``max_running``, ``requests_per_minute``) rounded down, but at least 1 where the limit
    is at least 1 (a ``max_running = 1`` client runs one job per replica rather than none).
    A limit of 0 stays 0.

Both modes, whatever is being done:

* *Nothing hangs.* Redis calls time out after ~0.5 s (the store's client); after a
  failure a circuit breaker (:class:`CircuitBreaker`) sends no call to Redis for
  ``retry_s`` (3 s), then lets one call through as a probe; the first success closes it.
* *Settlements never raise* (``settle``, ``renew``): they go to Redis when it answers, else
  to memory; both always go to memory too, so slots taken during an outage are given back
  there. A ``settle`` Redis did not hear is remembered (:mod:`gpu_backend.stores.unsent_releases`,
  bounded) and its release sent by :meth:`ResilientStore.send_unsent` once Redis answers
  again, so a Redis that returns with its data holds no slot for a finished job.
* *Reads* (``usage``, ``usage_keys``, ``count``, ``slot_counts``, overrides) fall back to
  memory: overrides from a mirror refreshed by every successful read from Redis.
  ``overrides_version`` is negative while served from memory, so a cache that compares
  versions re-reads both when Redis goes away and when it comes back.
* *Operator writes* (``set_overrides``, ``clear_overrides``, ``reset``) raise
  ``StoreUnavailable`` in both modes: an operator must know that a change did not land.

The usage spent while Redis was down is counted in memory only and never replayed into
Redis, so nothing is charged twice. A reservation taken in Redis and settled during the
outage keeps its estimate charged in Redis (its correction is lost, not applied twice);
one taken in memory and settled after recovery has its correction applied to Redis.
Slots held in memory when Redis returns are unknown to Redis until those jobs end, so for
at most one job time a client may run up to its local share on top of its Redis count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from splitspace.gpu_backend.stores.unsent_releases import UnsentReleases
from splitspace.gpu_backend.stores.usage import (
    AdmitGrant,
    AdmitPlan,
    Lease,
    MemoryUsageStore,
    Renewal,
    SlotCounts,
    SlotGrant,
    SlotKind,
    StoreUnavailable,
    UsageStore,
)
from splitspace.gpu_backend.stores.write_behind import SqliteUsageStore, WriteBehindStore
from splitspace.shared.config.circuit_breaker import (
    DEFAULT_RETRY_S,
    CircuitBreaker,
    FailureMode,
    check_failure_mode,
    local_share,
)

if TYPE_CHECKING:
    from pathlib import Path

    from splitspace.gpu_backend.stores.redis_store import AsyncRedisStore

__all__ = [
    "FailureMode",
    "CircuitBreaker",
    "ResilientStore",
    "AsyncResilientStore",
    "open_store",
    "open_async_store",
    "DEFAULT_RETRY_S",
]

log = logging.getLogger("splitspace.store")

T = TypeVar("T")


class _Route(enum.Enum):
    ADMIT = "admit"  # closed: refuse; local: memory with shared limits
    SETTLE = "settle"  # never raise: Redis if up, else memory
    READ = "read"  # never raise: Redis if up, else memory
    OPERATOR = "operator"  # raise when Redis is down, in both modes


def _resend(key: str, job_id: str, primary: UsageStore) -> bool:
    """Send one unsent release (:meth:`ResilientStore.send_unsent`); True once sent."""
    primary.settle(key, job_id)
    return True


class _Wrapper:
    """What both wrappers share: the primary, the memory fallback, the breaker, and the
    routing of one call: ``if allow(): with _verdict(): return <primary call>``, else
    :meth:`_fall_back`; in ``local`` mode, limits shared among the replicas."""

    def __init__(
        self,
        primary: Any,
        fallback: MemoryUsageStore | None = None,
        *,
        mode: FailureMode = "closed",
        replicas: int = 1,
        breaker: CircuitBreaker | None = None,
        unsent: UnsentReleases | None = None,
    ) -> None:
        check_failure_mode(mode, replicas)
        self.primary = primary
        self.mode: FailureMode = mode
        self.replicas = int(replicas)
        self.fallback = fallback if fallback is not None else MemoryUsageStore()
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.unsent = unsent if unsent is not None else UnsentReleases()

    def _share(self, limit: float) -> float:
        return local_share(limit, self.replicas)

    @contextlib.contextmanager
    def _verdict(self) -> Iterator[None]:
        """The verdict on one primary call. Redis answered (a result, or an error that is a
        bug: not an outage): the breaker closes. It did not (``StoreUnavailable``): the
        breaker opens and the exception is swallowed, so the caller falls back. Cancelled
        mid-call: no verdict, the next caller may probe."""
        try:
            yield
        except StoreUnavailable as exc:
            if self.breaker.failed():
                what = "refusing admissions" if self.mode == "closed" else f"serving with limits / {self.replicas}"
                log.warning("%s; %s, retrying every %.0f s", exc.reason, what, self.breaker.retry_s)
            return
        except Exception:
            self._answered()
            raise
        except BaseException:
            self.breaker.abandoned()
            raise
        self._answered()

    def _answered(self) -> None:
        if self.breaker.succeeded():
            log.warning("shared store (Redis) reachable again: global limits back in force")

    def _fall_back(self, route: _Route, on_fallback: Callable[[UsageStore], T]) -> T:
        """Serve a call the shared store did not: refuse it (operator writes; admissions
        in ``closed`` mode) or let the memory store answer."""
        if route is _Route.OPERATOR or (route is _Route.ADMIT and self.mode == "closed"):
            retry = max(self.breaker.retry_after(), 1.0)
            raise StoreUnavailable("the shared store (Redis) is unreachable; nothing was charged", retry)
        return on_fallback(self.fallback)


class ResilientStore(_Wrapper):
    """A shared ``primary`` (a :class:`~gpu_backend.stores.redis_store.RedisStore`) that keeps
    its promises while it is down, for threads (the GPU thread, the lease renewer, the
    operators' reads); see the module docstring."""

    primary: UsageStore

    def _call(self, route: _Route, on_primary: Callable[[UsageStore], T], on_fallback: Callable[[UsageStore], T]) -> T:
        if self.breaker.allow():
            with self._verdict():
                return on_primary(self.primary)
        return self._fall_back(route, on_fallback)

    # -- a job's steps ---------------------------------------------------------------

    def start_job(
        self,
        key: str,
        job_id: str,
        limit: float,
        lease_s: float,
        service_delta: float,
        vtime_key: str,
        now: float | None = None,
    ) -> SlotGrant:
        return self._call(
            _Route.ADMIT,
            lambda p: p.start_job(key, job_id, limit, lease_s, service_delta, vtime_key, now),
            lambda f: f.start_job(key, job_id, self._share(limit), lease_s, service_delta, vtime_key, now),
        )

    def settle(
        self,
        key: str,
        job_id: str,
        adjustments: Iterable[tuple[str, float]] = (),
        *,
        forget_rate: bool = False,
        service_delta: float = 0.0,
        now: float | None = None,
    ) -> None:
        """Never raises. The job's slots are given back in memory too (they may have been
        taken there during an outage); one Redis did not hear is counted in memory and its
        release kept to send when Redis answers again."""
        deltas = list(adjustments)
        self.fallback.settle(key, job_id, now=now)

        def in_memory(f: UsageStore) -> None:
            self.unsent.add(key, job_id)
            f.settle(key, job_id, deltas, forget_rate=forget_rate, service_delta=service_delta, now=now)

        self._call(
            _Route.SETTLE,
            lambda p: p.settle(key, job_id, deltas, forget_rate=forget_rate, service_delta=service_delta, now=now),
            in_memory,
        )

    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> Renewal:
        wanted = list(leases)
        local = self.fallback.renew(wanted, lease_s, now)
        return self._call(_Route.SETTLE, lambda p: p.renew(wanted, lease_s, now), lambda f: local)

    def send_unsent(self) -> int:
        """Send the releases of the settlements Redis missed (:attr:`unsent`), oldest first,
        while it answers; returns how many were sent. No I/O while none wait or while the
        breaker keeps calls away from Redis."""
        sent = 0
        for key, job_id in self.unsent.pending():
            if not self._call(_Route.SETTLE, functools.partial(_resend, key, job_id), lambda f: False):
                break  # Redis still away: the rest wait for the next try
            self.unsent.sent(key, job_id)
            sent += 1
        return sent

    # -- reads -----------------------------------------------------------------------

    def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
        return self._call(_Route.READ, lambda p: p.usage(key, now), lambda f: f.usage(key, now))

    def usage_keys(self, now: float | None = None) -> list[str]:
        return self._call(_Route.READ, lambda p: p.usage_keys(now), lambda f: f.usage_keys(now))

    def count(self, kind: SlotKind, key: str, now: float | None = None) -> int:
        return self._call(_Route.READ, lambda p: p.count(kind, key, now), lambda f: f.count(kind, key, now))

    def slot_counts(self, now: float | None = None) -> dict[str, SlotCounts]:
        return self._call(_Route.READ, lambda p: p.slot_counts(now), lambda f: f.slot_counts(now))

    # -- overrides and operators -----------------------------------------------------

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        def primary(p: UsageStore) -> dict[str, dict[str, Any]]:
            values = p.all_overrides()
            mirror = self.fallback.all_overrides()
            for cid in mirror.keys() | values.keys():
                if mirror.get(cid) != values.get(cid):
                    self.fallback.clear_overrides(cid)
                    if cid in values:
                        self.fallback.set_overrides(cid, values[cid])
            return values

        return self._call(_Route.READ, primary, lambda f: f.all_overrides())

    def overrides_version(self) -> int:
        return self._call(_Route.READ, lambda p: p.overrides_version(), lambda f: -1 - f.overrides_version())

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        self._call(_Route.OPERATOR, lambda p: p.set_overrides(client_id, values), lambda f: None)
        self.fallback.set_overrides(client_id, values)

    def clear_overrides(self, client_id: str) -> None:
        self._call(_Route.OPERATOR, lambda p: p.clear_overrides(client_id), lambda f: None)
        self.fallback.clear_overrides(client_id)

    def reset(self, key: str) -> None:
        self.fallback.reset(key)
        self._call(_Route.OPERATOR, lambda p: p.reset(key), lambda f: None)

    def close(self) -> None:
        self.primary.close()
        self.fallback.close()


class AsyncResilientStore(_Wrapper):
    """The event loop's wrapper, over an :class:`~gpu_backend.stores.redis_store.AsyncRedisStore`:
    admission, with the same routing. Give it the sync wrapper's ``fallback``, ``breaker``
    and ``unsent`` to share one local state and one outage verdict."""

    primary: AsyncRedisStore

    async def admit(self, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
        if self.breaker.allow():
            with self._verdict():  # a cancellation here is no verdict on Redis
                return await self.primary.admit(plan, now)
        shared = dataclasses.replace(  # this replica's share of each limit
            plan,
            max_queued=self._share(plan.max_queued),
            rate_limit=None if plan.rate_limit is None else self._share(plan.rate_limit),
            reservations=tuple(dataclasses.replace(r, limit=r.limit / self.replicas) for r in plan.reservations),
        )
        return self._fall_back(_Route.ADMIT, lambda f: f.admit(shared, now))

    async def close(self) -> None:
        await self.primary.close()
        self.fallback.close()


def open_store(
    *,
    redis_url: str | None,
    sqlite_path: Path,
    failure: FailureMode = "closed",
    replicas: int = 1,
    retry_s: float = DEFAULT_RETRY_S,
) -> WriteBehindStore | ResilientStore:
    """The store a tier uses, from its settings (called at the edge, e.g. the GPU app):
    SQLite at ``sqlite_path`` without a Redis URL, else Redis with the failure mode."""
    if not redis_url:
        return WriteBehindStore(SqliteUsageStore(sqlite_path))
    from splitspace.gpu_backend.stores.redis_store import RedisStore

    shared: UsageStore = RedisStore.from_url(redis_url)
    return ResilientStore(shared, mode=failure, replicas=replicas, breaker=CircuitBreaker(retry_s))


def open_async_store(
    *,
    redis_url: str,
    failure: FailureMode = "closed",
    replicas: int = 1,
    retry_s: float = DEFAULT_RETRY_S,
    fallback: MemoryUsageStore | None = None,
    breaker: CircuitBreaker | None = None,
    unsent: UnsentReleases | None = None,
) -> AsyncResilientStore:
    """The event-loop twin of :func:`open_store` for Redis. Pass the sync store's
    ``fallback``, ``breaker`` and ``unsent`` to share one local state, one outage verdict
    and one list of releases to send between the loop and the GPU thread."""
    from splitspace.gpu_backend.stores.redis_store import AsyncRedisStore

    return AsyncResilientStore(
        AsyncRedisStore.from_url(redis_url),
        fallback,
        mode=failure,
        replicas=replicas,
        breaker=breaker or CircuitBreaker(retry_s),
        unsent=unsent,
    )
