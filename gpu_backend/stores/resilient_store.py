"""What a tier does while its shared store (Redis) is down: ``SPLITSPACE_REDIS_FAILURE``.

Why: a shared store is a new way to fail, and silently falling back to per-replica limits
multiplies every limit. So the choice is explicit and bounded (docs/scaling.md, "When Redis
is down"): ``closed`` refuses admissions with ``StoreUnavailable``; ``local`` admits from an
in-process :class:`MemoryUsageStore` with each limit divided among ``replicas``. A circuit
breaker keeps calls away from a dead Redis for ``retry_s``. Settlements and renewals never
raise: they go to memory too, and a release Redis missed is kept (bounded) and sent once it
answers (:meth:`ResilientStore.send_unsent`). Reads fall back to memory (overrides from a
mirror; their version negative meanwhile); operator writes raise in both modes. Usage spent
during an outage is never replayed into Redis, so nothing is charged twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

from splitspace.gpu_backend.stores.redis_store import RedisStore
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
)
from splitspace.gpu_backend.stores.write_behind import SqliteUsageStore, WriteBehindStore
from splitspace.shared.config.circuit_breaker import (
    DEFAULT_RETRY_S,
    CircuitBreaker,
    FailureMode,
    check_failure_mode,
    local_share,
)
from splitspace.shared.contract.quotas import OverrideValues

log = logging.getLogger("splitspace.store")
T = TypeVar("T")

RETRY_EVERY_S = 0.2
"""How often a tier with unsent releases checks whether Redis answers again."""
UNSENT_LIMIT = 10_000
"""Releases kept at most; past that the oldest is dropped (its lease expires by itself)."""


def _release(key: str, job_id: str, primary: RedisStore) -> bool:
    primary.settle(key, job_id)
    return True


class ResilientStore:
    """A :class:`RedisStore` that keeps its promises while Redis is down: ``admit_async``
    on the event loop, every other call on threads, sharing one breaker and one memory."""

    def __init__(
        self,
        primary: RedisStore,
        fallback: MemoryUsageStore | None = None,
        *,
        mode: FailureMode = "closed",
        replicas: int = 1,
        breaker: CircuitBreaker | None = None,
        unsent_limit: int = UNSENT_LIMIT,
    ) -> None:
        check_failure_mode(mode, replicas)
        self.primary, self.mode, self.replicas = primary, mode, int(replicas)
        self.fallback = fallback if fallback is not None else MemoryUsageStore()
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.unsent: OrderedDict[tuple[str, str], None] = OrderedDict()  # (flow, job) of missed releases
        self._unsent_limit = unsent_limit
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _verdict(self) -> Iterator[None]:
        """Redis answered (a result, or an error that is a bug): the breaker closes. It did
        not (``StoreUnavailable``): the breaker opens and the caller falls back (swallowed).
        Cancelled mid-call: no verdict, the next caller may probe."""
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

    def _call(self, on_primary: Callable[[RedisStore], T], on_fallback: Callable[[MemoryUsageStore], T]) -> T:
        """Redis if the breaker lets the call through and it answers, else ``on_fallback``."""
        if self.breaker.allow():
            with self._verdict():
                return on_primary(self.primary)
        return on_fallback(self.fallback)

    def _refuse(self, _: object = None) -> NoReturn:
        retry = max(self.breaker.retry_after(), 1.0)
        raise StoreUnavailable("the shared store (Redis) is unreachable; nothing was charged", retry)

    async def admit_async(self, plan: AdmitPlan) -> AdmitGrant:
        if self.breaker.allow():
            with self._verdict():  # a cancellation here is no verdict on Redis
                return await self.primary.admit_async(plan)
        if self.mode == "closed":
            self._refuse()
        shared = dataclasses.replace(  # this replica's share of each limit
            plan,
            max_queued=local_share(plan.max_queued, self.replicas),
            rate_limit=None if plan.rate_limit is None else local_share(plan.rate_limit, self.replicas),
            reservations=tuple(dataclasses.replace(r, limit=r.limit / self.replicas) for r in plan.reservations),
        )
        return self.fallback.admit(shared)

    def start_job(
        self, key: str, job_id: str, limit: float, lease_s: float, service_delta: float, vtime_key: str
    ) -> SlotGrant:
        def local(f: MemoryUsageStore) -> SlotGrant:
            if self.mode == "closed":
                self._refuse()
            return f.start_job(key, job_id, local_share(limit, self.replicas), lease_s, service_delta, vtime_key)

        return self._call(lambda p: p.start_job(key, job_id, limit, lease_s, service_delta, vtime_key), local)

    def settle(
        self,
        key: str,
        job_id: str,
        adjustments: Iterable[tuple[str, float]] = (),
        *,
        forget_rate: bool = False,
        service_delta: float = 0.0,
    ) -> None:
        """Never raises. The slots go back in memory too (taken there during an outage?);
        one Redis did not hear is counted in memory and its release kept for later."""
        deltas = list(adjustments)
        self.fallback.settle(key, job_id)

        def in_memory(f: MemoryUsageStore) -> None:
            with self._lock:
                self.unsent[(key, job_id)] = None
                while len(self.unsent) > self._unsent_limit:
                    self.unsent.popitem(last=False)
            f.settle(key, job_id, deltas, forget_rate=forget_rate, service_delta=service_delta)

        self._call(
            lambda p: p.settle(key, job_id, deltas, forget_rate=forget_rate, service_delta=service_delta), in_memory
        )

    def renew(self, leases: Iterable[Lease], lease_s: float) -> Renewal:
        wanted = list(leases)
        local = self.fallback.renew(wanted, lease_s)
        return self._call(lambda p: p.renew(wanted, lease_s), lambda f: local)

    def send_unsent(self) -> int:
        """Send the releases Redis missed, oldest first, while it answers; how many were sent."""
        with self._lock:
            pending = list(self.unsent)
        for sent, (key, job_id) in enumerate(pending):
            if not self._call(functools.partial(_release, key, job_id), lambda f: False):
                return sent  # Redis still away: the rest wait for the next try
            with self._lock:
                self.unsent.pop((key, job_id), None)
        return len(pending)

    def usage(self, key: str) -> tuple[float, float]:
        return self._call(lambda p: p.usage(key), lambda f: f.usage(key))

    def usage_keys(self) -> list[str]:
        return self._call(lambda p: p.usage_keys(), lambda f: f.usage_keys())

    def count(self, kind: SlotKind, key: str) -> int:
        return self._call(lambda p: p.count(kind, key), lambda f: f.count(kind, key))

    def slot_counts(self) -> dict[str, SlotCounts]:
        return self._call(lambda p: p.slot_counts(), lambda f: f.slot_counts())

    def all_overrides(self) -> dict[str, OverrideValues]:
        def primary(p: RedisStore) -> dict[str, OverrideValues]:
            values = p.all_overrides()
            mirror = self.fallback.all_overrides()
            for cid in mirror.keys() | values.keys():
                if mirror.get(cid) != values.get(cid):
                    self.fallback.clear_overrides(cid)
                    if cid in values:
                        self.fallback.set_overrides(cid, values[cid])
            return values

        return self._call(primary, lambda f: f.all_overrides())

    def overrides_version(self) -> int:
        return self._call(lambda p: p.overrides_version(), lambda f: -1 - f.overrides_version())

    def set_overrides(self, client_id: str, values: OverrideValues) -> None:
        self._call(lambda p: p.set_overrides(client_id, values), self._refuse)
        self.fallback.set_overrides(client_id, values)

    def clear_overrides(self, client_id: str) -> None:
        self._call(lambda p: p.clear_overrides(client_id), self._refuse)
        self.fallback.clear_overrides(client_id)

    def reset(self, key: str) -> None:
        self.fallback.reset(key)
        self._call(lambda p: p.reset(key), self._refuse)

    def close(self) -> None:
        self.primary.close()
        self.fallback.close()

    async def aclose(self) -> None:
        await self.primary.aclose()


def open_store(
    *,
    redis_url: str | None,
    sqlite_path: Path,
    failure: FailureMode = "closed",
    replicas: int = 1,
    retry_s: float = DEFAULT_RETRY_S,
) -> WriteBehindStore | ResilientStore:
    """The store a tier uses: SQLite at ``sqlite_path`` without a Redis URL, else Redis
    with the failure mode."""
    if not redis_url:
        return WriteBehindStore(SqliteUsageStore(sqlite_path))
    breaker = CircuitBreaker(retry_s)
    return ResilientStore(RedisStore.from_url(redis_url), mode=failure, replicas=replicas, breaker=breaker)
