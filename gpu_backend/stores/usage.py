"""Per-client state that admission checks and changes: the one protocol, its values, the memory store.

Why this module exists: quotas are counted in GPU-seconds over a window (an hour by
default). If that count lived only in the scheduler's memory, restarting the GPU tier
would hand every client a fresh quota, and an operator's emergency override ("cap
key:nightly-bench at 2 queued") would vanish with it. And once several replicas serve one
client, every count a limit reads must live in one place that all of them share, or each
limit is multiplied by the replica count. So that state lives behind :class:`UsageStore`,
and each step of a job is one atomic call (check every limit and take, or take nothing),
so that two replicas can never both squeeze into the last GPU-second or the last slot:

* **usage windows** (``gpu_seconds``, ``address_gpu_seconds``): reserved at admission,
  settled with the GPU time measured. Windows are fixed and start at a key's first use:
  the window opened at ``t`` with length ``w`` counts everything until ``t + w``, and its
  length is the one of the reservation that opened it;
* **operator overrides** per client id, with a version counter replicas poll;
* **slots** (``max_queued``, ``max_running``): a set of *leases* per key, one per job, each
  expiring ``lease_s`` after it was taken or renewed, so that a replica that dies mid-job
  frees its client's slots within one lease, without an operator;
* **rate windows** (``requests_per_minute``): a sliding window of admission times per key;
* **fair-queueing service** per flow (the scheduler's virtual service counter), so that a
  client served on one GPU tier is not fresh on another.

Time: every method takes ``now`` (seconds, wall clock) or, given None, reads the store's
clock. The Redis store ignores it and reads Redis' ``TIME`` inside each script, so that
replicas whose clocks disagree still agree on every window and lease.

The stores, each written once: :class:`MemoryUsageStore` here (the local scheduler's
ledger, Redis' stand-in during an outage); :mod:`gpu_backend.stores.write_behind` (one
tier, SQLite); :mod:`gpu_backend.stores.redis_store` (any number of tiers).
``tests/test_store_contract.py`` runs one contract suite on memory and Redis.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from splitspace.shared.contract.errors import ServiceUnavailable

__all__ = [
    "UsageStore",
    "UsageLedger",
    "OverrideStore",
    "StoreUnavailable",
    "MemoryUsageStore",
    "SlotKind",
    "SLOT_KINDS",
    "Lease",
    "SlotGrant",
    "SlotCounts",
    "Renewal",
    "Reservation",
    "AdmitPlan",
    "AdmitGrant",
    "DEFAULT_LEASE_S",
    "DEFAULT_SERVICE_TTL_S",
]

_SLACK = 1e-9
"""Float slack so that three reservations of 0.1 fit a limit of 0.3."""

SlotKind = Literal["queued", "running"]
SLOT_KINDS: tuple[SlotKind, ...] = ("queued", "running")

DEFAULT_LEASE_S = 30.0
"""How long a slot outlives a replica that stopped renewing it (a crash, a kill -9)."""

DEFAULT_SERVICE_TTL_S = 86400.0
"""A flow's shared service counter is forgotten after this long without a change (it would
restart at the virtual time anyway); bounds the state kept for clients seen once."""


@dataclass(frozen=True)
class Lease:
    """One job's slot: ``kind`` (queued or running) in the set of ``key`` (a flow id)."""

    kind: SlotKind
    key: str
    job_id: str


@dataclass(frozen=True)
class SlotGrant:
    """What :meth:`UsageStore.start_job` decided: ``held`` counts the live running leases
    after the call, this job's included when granted."""

    granted: bool
    held: int


@dataclass(frozen=True)
class SlotCounts:
    """Live leases of one key, as :meth:`UsageStore.slot_counts` lists them."""

    queued: int = 0
    running: int = 0


@dataclass(frozen=True)
class Renewal:
    """What :meth:`UsageStore.renew` did: leases extended, and leases that had already
    expired (or were released) and were not brought back."""

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
    """Every shared check of one job's admission, for one :meth:`UsageStore.admit`: in
    order, the rate window of ``key`` (when ``rate_limit`` is set), a queued slot of
    ``key`` within ``max_queued``, then each reservation; once all pass, the service
    counters named in ``service`` are read (the fairness lead of the flow).

    ``nonce``: the call's identity-token nonce (``session/token.py``). A store that several
    GPU tiers share (Redis) checks it first: one it has seen within ``nonce_ttl_s``, for
    another job id, is refused as ``"replay"``; it is kept whatever the answer. A store of
    one process ignores it: that tier's own set has checked it already."""

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
    """What :meth:`UsageStore.admit` decided. Refused, nothing is left taken, and
    ``refused_by`` says which check: ``"rate"`` (``held`` admissions in the window,
    ``retry_after_s`` until the oldest leaves it), ``"queued"`` (``held`` leases),
    ``"quota"`` (reservation number ``quota`` of the plan: ``used`` in its window,
    ``retry_after_s`` until it resets) or ``"replay"`` (its ``nonce`` was admitted before,
    on any tier). Granted: ``service`` holds the counters read."""

    granted: bool
    refused_by: str = ""
    held: int = 0
    retry_after_s: float = 0.0
    quota: int = -1
    used: float = 0.0
    service: dict[str, float] = field(default_factory=dict)


class StoreUnavailable(ServiceUnavailable):
    """A shared store (Redis) cannot serve now: nothing was checked or changed.

    Raised by the Redis store at its boundary, and by :mod:`gpu_backend.stores.resilient_store`
    in ``closed`` mode with the time until it tries Redis again as ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, retry_after_s)


class UsageLedger(Protocol):
    """The GPU-second windows the local scheduler reserves and settles under the runner's
    lock (a :class:`MemoryUsageStore`, or the single tier's ``WriteBehindStore``)."""

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float) -> float | None:
        """Add ``amount`` to ``key``'s window if the total stays within ``limit`` (may be
        ``math.inf``): None when reserved, else the seconds until the window resets."""
        ...

    def adjust(self, key: str, delta: float, now: float) -> None:
        """Add ``delta`` (clamped at 0) to the live window; nothing if it expired."""
        ...

    def usage(self, key: str, now: float) -> tuple[float, float]:
        """``(used, resets_in_s)`` of the live window; ``(0.0, 0.0)`` when there is none."""
        ...

    def reset(self, key: str) -> None:
        """Forget ``key``'s usage."""
        ...


class OverrideStore(Protocol):
    """The operator overrides per client id (:class:`~gpu_backend.admission.limits.Overrides`)."""

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        """Every client's overrides, by client id."""
        ...

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        """Merge ``values`` into the client's overrides."""
        ...

    def clear_overrides(self, client_id: str) -> None:
        """Drop all overrides of one client."""
        ...

    def overrides_version(self) -> int:
        """A counter every override change increases: a replica re-reads them when it moved."""
        ...


class UsageStore(OverrideStore, Protocol):
    """The state GPU tiers share, a job's three steps each one atomic call (one script on
    Redis). ``now``: wall-clock seconds, or None for the store's own clock (Redis: its
    ``TIME``). A shared store that cannot be reached raises :class:`StoreUnavailable`."""

    def admit(self, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
        """Every check of ``plan`` and its changes, or none of them: the rate entry, the
        queued lease (a job that holds it already is granted again) and the reservations."""
        ...

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
        """Dispatch and charge: turn the job's queued lease of ``key`` into a running one if
        fewer than ``limit`` are live (its queued lease may have expired: it is admitted);
        granted, charge the flow ``key``'s service, ``S = max(S, V) + service_delta``, and
        raise the shared virtual time ``vtime_key`` to the job's start tag,
        ``V = max(V, S - service_delta)``. Refused, nothing changes."""
        ...

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
        """A job is done (ran, or left): give back its queued and running leases of ``key``,
        add each delta to its usage key's live window (clamped at 0), add ``service_delta``
        to the flow's service and with ``forget_rate`` take it out of the rate window."""
        ...

    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> Renewal:
        """Extend each live lease to ``lease_s`` from now. A lease that expired is lost:
        another job may hold its place, so it is reported, not brought back."""
        ...

    def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
        """``(used, resets_in_s)`` of the live window; ``(0.0, 0.0)`` when there is none."""
        ...

    def usage_keys(self, now: float | None = None) -> list[str]:
        """Every key with a live usage window, sorted, whichever replica spent it."""
        ...

    def reset(self, key: str) -> None:
        """Forget ``key``'s usage."""
        ...

    def count(self, kind: SlotKind, key: str, now: float | None = None) -> int:
        """Live ``kind`` leases of ``key``."""
        ...

    def slot_counts(self, now: float | None = None) -> dict[str, SlotCounts]:
        """Every key that holds live leases, with its counts, across all replicas."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


# -- shared rules -----------------------------------------------------------------------


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


def check_service(delta: float, floor: float | None = None) -> None:
    if not math.isfinite(delta) or (floor is not None and not math.isfinite(floor)):
        raise ValueError(f"bad service change: delta={delta!r} floor={floor!r}")


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
    """A :class:`UsageStore` and :class:`UsageLedger` in dicts; thread-safe, lost when the
    process ends. Expired entries are dropped when next looked at, and by
    :meth:`forget_expired` (a tier's housekeeping)."""

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
        self._overrides: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._slots: dict[tuple[str, str], dict[str, float]] = {}  # (kind, key) -> job -> expires
        self._rates: dict[str, dict[str, float]] = {}  # key -> job -> admitted at, oldest first
        self._service: dict[str, tuple[float, float]] = {}  # flow -> (value, expires)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def window(self, key: str) -> _Window | None:
        """A copy of ``key``'s window (for ``write_behind.py``, which persists it)."""
        with self._lock:
            w = self._windows.get(key)
            return None if w is None else _Window(w.used, w.start, w.window_s)

    # -- usage windows -----------------------------------------------------------------

    def _live(self, key: str, now: float) -> _Window | None:
        window = self._windows.get(key)
        return window if window is not None and window.live(now) else None

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float | None = None) -> float | None:
        check_reservation(amount, limit, window_s)
        now = self._now(now)
        with self._lock:
            window = self._live(key, now) or _Window(0.0, now, window_s)
            if window.used + amount > limit + _SLACK:
                return window.resets_in(now)
            window.used += amount
            self._windows[key] = window
            return None

    def adjust(self, key: str, delta: float, now: float | None = None) -> None:
        now = self._now(now)
        with self._lock:
            window = self._live(key, now)
            if window is not None:
                window.used = max(0.0, window.used + delta)

    def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
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

    def forget_expired(self, now: float | None = None) -> int:
        """Drop what no longer counts: usage windows that ended, fair service that expired,
        slots whose leases all ended. Nothing a client is owed (a live window reads the
        same after); O(keys), for a tier's periodic housekeeping. How many keys are left."""
        now = self._now(now)
        with self._lock:
            for key in [k for k, w in self._windows.items() if not w.live(now)]:
                del self._windows[key]
            for flow in [f for f, (_, expires) in self._service.items() if expires <= now]:
                del self._service[flow]
            for slot in [k for k, held in self._slots.items() if all(e <= now for e in held.values())]:
                del self._slots[slot]
            return len(self._windows) + len(self._service) + len(self._slots) + len(self._rates)

    # -- overrides ---------------------------------------------------------------------

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        with self._lock:
            self._overrides.setdefault(client_id, {}).update(values)
            self._version += 1

    def clear_overrides(self, client_id: str) -> None:
        with self._lock:
            self._overrides.pop(client_id, None)
            self._version += 1

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {cid: dict(values) for cid, values in self._overrides.items()}

    def overrides_version(self) -> int:
        with self._lock:
            return self._version

    # -- a job's steps -----------------------------------------------------------------

    def _leases(self, kind: str, key: str, now: float) -> dict[str, float]:
        """The live leases of one set (lock held); expired ones dropped."""
        leases = self._slots.setdefault((kind, key), {})
        for job_id in [j for j, expires in leases.items() if expires <= now]:
            del leases[job_id]
        return leases

    def admit(self, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
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
        """The service of each known flow among ``flow_ids`` (what :meth:`admit` reads)."""
        now = self._now(now)
        with self._lock:
            found = {f: self._service.get(f) for f in flow_ids}
            return {f: v[0] for f, v in found.items() if v is not None and v[1] > now}

    def close(self) -> None:
        """Nothing to release; here so every store can be closed alike."""
