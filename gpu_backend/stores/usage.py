"""Per-client state that admission checks and changes: its values, the rules, the memory store.

Why: quotas (GPU-seconds over a window), operator overrides, slots (leases per job, so a
dead replica frees its client's slots within ``lease_s``), rate windows and fair service
must outlive a restart and, with several replicas, live in one place they all share, each
step of a job one atomic call. The stores: :class:`MemoryUsageStore` here (the local
ledger, and Redis' stand-in during an outage), ``write_behind`` (one tier, SQLite) and
``redis_store`` (any number of tiers); ``tests/test_store_contract.py`` holds them to one
contract. Design: docs/scaling.md. ``now`` is wall-clock seconds, or None for the store's
clock (Redis reads its ``TIME`` and ignores it).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

from splitspace.shared.contract.errors import ServiceUnavailable
from splitspace.shared.contract.quotas import OverrideValues

if TYPE_CHECKING:
    from splitspace.gpu_backend.stores.redis_store import RedisStore

_SLACK = 1e-9
"""Float slack so that three reservations of 0.1 fit a limit of 0.3."""

SlotKind = Literal["queued", "running"]
SLOT_KINDS: tuple[SlotKind, ...] = ("queued", "running")
DEFAULT_LEASE_S = 30.0
"""How long a slot outlives a replica that stopped renewing it (a crash, a kill -9)."""
DEFAULT_SERVICE_TTL_S = 86400.0
"""A flow's shared service is forgotten after this long without a change."""


@dataclass(frozen=True)
class Lease:
    """One job's slot: ``kind`` in the set of ``key`` (a flow id)."""

    kind: SlotKind
    key: str
    job_id: str


@dataclass(frozen=True)
class SlotGrant:
    """``start_job``'s answer; ``held``: live running leases after it."""

    granted: bool
    held: int


@dataclass(frozen=True)
class SlotCounts:
    """Live leases of one key."""

    queued: int = 0
    running: int = 0


@dataclass(frozen=True)
class Renewal:
    """Leases extended, and leases already expired or released (not brought back)."""

    renewed: tuple[Lease, ...]
    lost: tuple[Lease, ...]


@dataclass(frozen=True)
class Reservation:
    """GPU-seconds to reserve against one key's window."""

    key: str
    amount: float
    limit: float
    window_s: float


@dataclass(frozen=True)
class AdmitPlan:
    """Every shared check of one admission, in order: the rate window of ``key`` (when
    ``rate_limit`` is set), a queued slot within ``max_queued``, each reservation; then the
    ``service`` counters are read. A shared store refuses a ``nonce`` seen within
    ``nonce_ttl_s`` for another job (``"replay"``); one process's store ignores it."""

    key: str
    job_id: str
    max_queued: float
    lease_s: float
    reservations: tuple[Reservation, ...] = ()
    rate_limit: float | None = None
    rate_window_s: float = 60.0
    service: tuple[str, ...] = ()
    nonce: str = ""
    nonce_ttl_s: float = 120.0


@dataclass(frozen=True)
class AdmitGrant:
    """``admit``'s answer. Refused, nothing is taken; ``refused_by`` is ``"rate"``,
    ``"queued"``, ``"quota"`` (reservation number ``quota``, ``used`` in its window) or
    ``"replay"``. Granted, ``service`` holds the counters read."""

    granted: bool
    refused_by: str = ""
    held: int = 0
    retry_after_s: float = 0.0
    quota: int = -1
    used: float = 0.0
    service: dict[str, float] = field(default_factory=dict)


class StoreUnavailable(ServiceUnavailable):
    """A shared store (Redis) cannot serve now: nothing was checked or changed."""


class OverrideStore(Protocol):
    """Operator overrides per client id, with a version every change increases."""

    def all_overrides(self) -> dict[str, OverrideValues]: ...
    def set_overrides(self, client_id: str, values: OverrideValues) -> None: ...
    def clear_overrides(self, client_id: str) -> None: ...
    def overrides_version(self) -> int: ...


@dataclass(slots=True)
class _Window:
    used: float
    start: float
    window_s: float

    def live(self, now: float) -> bool:
        return self.start + self.window_s > now

    def resets_in(self, now: float) -> float:
        return max(0.0, self.start + self.window_s - now)


def check_reservation(amount: float, limit: float, window_s: float) -> None:
    if not amount >= 0 or math.isnan(limit) or not window_s > 0:
        raise ValueError(f"bad reservation: amount={amount!r} limit={limit!r} window_s={window_s!r}")


def check_slot(kind: str, limit: float, lease_s: float) -> None:
    if kind not in SLOT_KINDS:
        raise ValueError(f"bad slot kind {kind!r}: one of {', '.join(SLOT_KINDS)}")
    if math.isnan(limit) or limit < 0 or not lease_s > 0:
        raise ValueError(f"bad slot: limit={limit!r} lease_s={lease_s!r}")


def check_service(delta: float) -> None:
    if not math.isfinite(delta):
        raise ValueError(f"bad service change: delta={delta!r}")


def check_plan(plan: AdmitPlan) -> None:
    check_slot("queued", plan.max_queued, plan.lease_s)
    rate = plan.rate_limit
    if rate is not None and (math.isnan(rate) or rate < 0 or not plan.rate_window_s > 0):
        raise ValueError(f"bad rate window: limit={rate!r} window_s={plan.rate_window_s!r}")
    for r in plan.reservations:
        check_reservation(r.amount, r.limit, r.window_s)
    if plan.nonce and not plan.nonce_ttl_s > 0:
        raise ValueError(f"nonce_ttl_s must be positive, got {plan.nonce_ttl_s!r}")


class MemoryUsageStore:
    """The store in dicts, thread-safe, lost with the process; the reference for every
    store's contract. Expired entries go when next looked at and by :meth:`forget_expired`."""

    def __init__(
        self,
        windows: dict[str, _Window] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
    ) -> None:
        self._clock = clock
        self._service_ttl_s = service_ttl_s
        self._lock = threading.RLock()
        self._windows: dict[str, _Window] = dict(windows or {})
        self._overrides: dict[str, OverrideValues] = {}
        self._version = 0
        self._slots: dict[tuple[str, str], dict[str, float]] = {}  # (kind, key) -> job -> expires
        self._rates: dict[str, dict[str, float]] = {}  # key -> job -> admitted at, oldest first
        self._service: dict[str, tuple[float, float]] = {}  # flow -> (value, expires)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _changed(self, key: str) -> None:
        """A usage window changed (``write_behind`` persists it)."""

    def _live(self, key: str, now: float) -> _Window | None:
        window = self._windows.get(key)
        return window if window is not None and window.live(now) else None

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float | None = None) -> float | None:
        """Add ``amount`` if the window stays within ``limit``: None, else seconds to its reset."""
        check_reservation(amount, limit, window_s)
        now = self._now(now)
        with self._lock:
            window = self._live(key, now) or _Window(0.0, now, window_s)
            if window.used + amount > limit + _SLACK:
                return window.resets_in(now)
            window.used += amount
            self._windows[key] = window
            self._changed(key)
            return None

    def adjust(self, key: str, delta: float, now: float | None = None) -> None:
        """Add ``delta`` (clamped at 0) to the live window; nothing if it expired."""
        now = self._now(now)
        with self._lock:
            window = self._live(key, now)
            if window is not None:
                window.used = max(0.0, window.used + delta)
            self._changed(key)

    def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
        """``(used, resets_in_s)`` of the live window; ``(0.0, 0.0)`` when there is none."""
        now = self._now(now)
        with self._lock:
            window = self._live(key, now)
            return (0.0, 0.0) if window is None else (window.used, window.resets_in(now))

    def usage_keys(self, now: float | None = None) -> list[str]:
        now = self._now(now)
        with self._lock:
            return sorted(k for k, w in self._windows.items() if w.live(now))

    def reset(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)
            self._changed(key)

    def forget_expired(self, now: float | None = None) -> int:
        """Drop ended windows, service and slots (a tier's housekeeping); how many keys are left."""
        now = self._now(now)
        with self._lock:
            for key in [k for k, w in self._windows.items() if not w.live(now)]:
                del self._windows[key]
            for flow in [f for f, (_, expires) in self._service.items() if expires <= now]:
                del self._service[flow]
            for slot in [k for k, held in self._slots.items() if all(e <= now for e in held.values())]:
                del self._slots[slot]
            return len(self._windows) + len(self._service) + len(self._slots) + len(self._rates)

    def set_overrides(self, client_id: str, values: OverrideValues) -> None:
        with self._lock:
            self._overrides.setdefault(client_id, {}).update(values)
            self._version += 1

    def clear_overrides(self, client_id: str) -> None:
        with self._lock:
            self._overrides.pop(client_id, None)
            self._version += 1

    def all_overrides(self) -> dict[str, OverrideValues]:
        with self._lock:
            return {cid: values.copy() for cid, values in self._overrides.items()}

    def overrides_version(self) -> int:
        with self._lock:
            return self._version

    def _leases(self, kind: str, key: str, now: float) -> dict[str, float]:
        leases = self._slots.setdefault((kind, key), {})
        for job_id in [j for j, expires in leases.items() if expires <= now]:
            del leases[job_id]
        return leases

    def admit(self, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
        """Every check of ``plan`` and its changes, or none: the rate entry, the queued
        lease (a job that holds it is granted again) and the reservations."""
        check_plan(plan)
        now = self._now(now)
        with self._lock:
            rates = self._rates.get(plan.key, {})  # in admission order: the oldest first
            while rates and next(iter(rates.values())) <= now - plan.rate_window_s:
                del rates[next(iter(rates))]
            if plan.rate_limit is not None and plan.job_id not in rates and len(rates) >= plan.rate_limit:
                oldest = next(iter(rates.values()), now)
                return AdmitGrant(False, "rate", held=len(rates), retry_after_s=oldest + plan.rate_window_s - now)
            queued = self._leases("queued", plan.key, now)
            if plan.job_id not in queued and len(queued) >= plan.max_queued:
                return AdmitGrant(False, "queued", held=len(queued))
            taken: dict[str, _Window] = {}
            for i, r in enumerate(plan.reservations):
                w = taken.get(r.key) or self._live(r.key, now) or _Window(0.0, now, r.window_s)
                if w.used + r.amount > r.limit + _SLACK:
                    return AdmitGrant(False, "quota", retry_after_s=w.resets_in(now), quota=i, used=w.used)
                taken[r.key] = _Window(w.used + r.amount, w.start, w.window_s)
            if plan.rate_limit is not None:
                self._rates.setdefault(plan.key, rates).setdefault(plan.job_id, now)
            queued[plan.job_id] = now + plan.lease_s
            self._windows.update(taken)
            for key in taken:
                self._changed(key)
            return AdmitGrant(True, service=self.service(plan.service, now))

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
        """Turn the job's queued lease into a running one if fewer than ``limit`` are live;
        granted, charge the flow ``S = max(S, V) + delta`` and raise the virtual time
        ``V = max(V, S - delta)``. Refused, nothing changes."""
        check_slot("running", limit, lease_s)
        check_service(service_delta)
        now = self._now(now)
        with self._lock:
            running = self._leases("running", key, now)
            if job_id not in running and len(running) >= limit:
                return SlotGrant(False, len(running))
            running[job_id] = now + lease_s
            self._slots.get(("queued", key), {}).pop(job_id, None)
            vtime = self.service([vtime_key], now).get(vtime_key, 0.0)
            charged = max(self.service([key], now).get(key, 0.0), vtime) + service_delta
            self._service[key] = (charged, now + self._service_ttl_s)
            self._service[vtime_key] = (max(vtime, charged - service_delta), now + self._service_ttl_s)
            return SlotGrant(True, len(running))

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
        """A job is done: give back its leases, adjust each usage key's live window, add
        ``service_delta`` to the flow and, with ``forget_rate``, drop its rate entry."""
        check_service(service_delta)
        now = self._now(now)
        with self._lock:
            for kind in SLOT_KINDS:
                self._slots.get((kind, key), {}).pop(job_id, None)
            for usage_key, delta in adjustments:
                self.adjust(usage_key, delta, now)
            if service_delta:
                value = self.service([key], now).get(key, 0.0) + service_delta
                self._service[key] = (value, now + self._service_ttl_s)
            if forget_rate:
                self._rates.get(key, {}).pop(job_id, None)

    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> Renewal:
        """Extend each live lease to ``lease_s`` from now; an expired one is lost, not brought back."""
        now = self._now(now)
        renewed: list[Lease] = []
        lost: list[Lease] = []
        with self._lock:
            for lease in leases:
                check_slot(lease.kind, 0, lease_s)
                held = self._leases(lease.kind, lease.key, now)
                if lease.job_id in held:
                    held[lease.job_id] = now + lease_s
                (renewed if lease.job_id in held else lost).append(lease)
        return Renewal(tuple(renewed), tuple(lost))

    def count(self, kind: SlotKind, key: str, now: float | None = None) -> int:
        check_slot(kind, 0, 1.0)
        now = self._now(now)
        with self._lock:
            return sum(1 for expires in self._slots.get((kind, key), {}).values() if expires > now)

    def slot_counts(self, now: float | None = None) -> dict[str, SlotCounts]:
        now = self._now(now)
        counts: dict[str, dict[str, int]] = {}
        with self._lock:
            for (kind, key), held in self._slots.items():
                n = sum(1 for expires in held.values() if expires > now)
                if n:
                    counts.setdefault(key, {})[kind] = n
        return {key: SlotCounts(**c) for key, c in counts.items()}

    def service(self, flow_ids: Iterable[str], now: float | None = None) -> dict[str, float]:
        now = self._now(now)
        with self._lock:
            found = {f: self._service.get(f) for f in flow_ids}
            return {f: v[0] for f, v in found.items() if v is not None and v[1] > now}

    def close(self) -> None:
        """Nothing to release."""


UsageLedger: TypeAlias = MemoryUsageStore
"""What the local scheduler reserves and settles under the runner's lock (memory or write-behind)."""
UsageStore: TypeAlias = "MemoryUsageStore | RedisStore"
"""A store that keeps the whole contract: memory (one process) or Redis (shared)."""
