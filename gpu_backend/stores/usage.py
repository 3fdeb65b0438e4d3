"""Per-client state that admission checks and changes: usage, overrides, slots, rates, service.

Why this module exists: quotas are counted in GPU-seconds over a window (an hour by
default). If that count lived only in the scheduler's memory, restarting the GPU tier
(a deploy, a crash, a Space rebuild) would hand every client a fresh quota, and an
operator's emergency override ("cap key:nightly-bench at 2 queued") would vanish with it.
And once several replicas serve one client, every count that a limit reads must live in
one place that all of them share, or each limit is multiplied by the replica count. So
that state lives behind :class:`UsageStore`, and every check-and-change is one atomic
call (check the limit and add in one step), so that two replicas can never both squeeze
into the last GPU-second or the last slot:

* **usage windows** (``gpu_seconds``, ``address_gpu_seconds``): :meth:`~UsageStore.reserve`
  and :meth:`~UsageStore.adjust` (settle a reservation with the GPU time measured);
* **operator overrides** per client id, with a version counter replicas poll;
* **slots** (``max_queued``, ``max_running``, the frontend's in-flight caps): a per-key
  set of *leases*, one per job, each expiring ``lease_s`` after it was taken or last
  renewed. A replica that dies mid-job stops renewing, so its client's slots come free
  within one lease without an operator. :meth:`~UsageStore.move` turns a queued lease into
  a running one at dispatch, atomically against the running limit;
* **rate windows** (``requests_per_minute``): the admission times of the last window per
  key, a sliding window;
* **fair-queueing service** per flow (the virtual service counter of the scheduler), so
  that a client served on one GPU tier is not fresh on another.

Windows are fixed and start at a key's first use: the window opened at ``t`` with length
``w`` counts everything until ``t + w``; the first reservation at or after that opens a
new, empty window. The window length is the one given to the reserve that opened it, so
an operator changing ``window_s`` takes effect at the next window.

Time: every method takes ``now`` (seconds, wall clock) or, given None, reads the store's
own clock (``time.time`` unless one is injected). Callers pass it always or never, in
one clock. A shared store does not trust its callers' clocks: the Redis store
(:mod:`gpu_backend.stores.redis_store`) ignores ``now`` and reads Redis' ``TIME`` inside each
script, so replicas whose clocks disagree still agree on every window and lease.

Three stores: :class:`MemoryUsageStore` (tests, single process, nothing survives),
:class:`SqliteUsageStore` (one file; several processes on one machine share it safely,
the default) and :class:`~gpu_backend.stores.redis_store.RedisStore` (any number of replicas on
any machines). ``tests/test_store_contract.py`` runs one contract suite on all three.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from splitspace.shared.contract.errors import ServiceUnavailable

__all__ = [
    "UsageStore",
    "StoreUnavailable",
    "MemoryUsageStore",
    "SqliteUsageStore",
    "SlotKind",
    "SLOT_KINDS",
    "Lease",
    "SlotGrant",
    "SlotCounts",
    "Renewal",
    "RateGrant",
    "Reservation",
    "AdmitPlan",
    "AdmitGrant",
    "admit_in_steps",
    "settle_in_steps",
    "start_job_in_steps",
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
    """One job's slot: ``kind`` (queued or running) in the set of ``key`` (a flow or client id)."""

    kind: SlotKind
    key: str
    job_id: str


@dataclass(frozen=True)
class SlotGrant:
    """What :meth:`UsageStore.acquire_slot` and :meth:`UsageStore.move` decided.

    ``held`` counts the live leases in the (target) set after the call, this job's
    included when granted: the "3 requests already queued" of a refusal."""

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
class RateGrant:
    """What :meth:`UsageStore.admit_rate` decided: ``held`` admissions in the window after
    the call; when refused, ``retry_after_s`` until the oldest leaves it (else 0)."""

    granted: bool
    held: int
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class Reservation:
    """GPU-seconds to reserve against one key's window (:meth:`UsageStore.reserve`)."""

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
    another job id, is refused as ``"replay"``; it is kept whatever the answer, as each
    tier's own set keeps it. A store of one process ignores it: that tier's own set has
    checked it already."""

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
    ``retry_after_s`` until the oldest leaves it), ``"queued"`` (``held`` leases) or
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


class UsageStore(Protocol):
    """The state admission reads and changes; each check-and-change is atomic.

    ``now``: seconds on the wall clock, or None for the store's own clock. The Redis
    store ignores it and uses the Redis server's ``TIME`` (one clock for all replicas).
    A shared store that cannot be reached raises :class:`StoreUnavailable`."""

    # -- usage windows -----------------------------------------------------------------

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float | None = None) -> float | None:
        """Atomically add ``amount`` to ``key``'s window if the total stays within ``limit``.

        Returns None when reserved, else the seconds until the window resets (retry after).
        ``limit`` may be ``math.inf``.
        """
        ...

    def adjust(self, key: str, delta: float, now: float | None = None) -> None:
        """Add ``delta`` (may be negative; the total is clamped at 0) to the live window.

        Settles a reservation with the measured cost. Does nothing if the window expired.
        """
        ...

    def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
        """``(used, resets_in_s)`` of the live window; ``(0.0, 0.0)`` when there is none."""
        ...

    def reset(self, key: str) -> None:
        """Forget ``key``'s usage."""
        ...

    def usage_keys(self, now: float | None = None) -> list[str]:
        """Every key with a live usage window, sorted: what operators list, whichever
        replica spent it."""
        ...

    # -- operator overrides ------------------------------------------------------------

    def get_overrides(self, client_id: str) -> dict[str, Any]:
        """The operator overrides of one client (empty when none)."""
        ...

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        """Merge ``values`` into the client's overrides."""
        ...

    def clear_overrides(self, client_id: str) -> None:
        """Drop all overrides of one client."""
        ...

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        """Every client's overrides, by client id."""
        ...

    def overrides_version(self) -> int:
        """A counter that every override change increases: a replica caching overrides
        re-reads them when it moved (one cheap read instead of all of them)."""
        ...

    # -- slots (max_queued, max_running, in-flight caps) --------------------------------

    def acquire_slot(
        self, kind: SlotKind, key: str, job_id: str, limit: float, lease_s: float, now: float | None = None
    ) -> SlotGrant:
        """Take a ``kind`` slot of ``key`` for ``job_id`` if fewer than ``limit`` live leases
        hold one; expired leases are dropped first, in the same step. A job that already
        holds the slot is granted again (its lease renewed), so retries are harmless."""
        ...

    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> Renewal:
        """Extend each live lease to ``lease_s`` from now. A lease that expired is lost:
        another job may hold its place, so it is reported, not brought back."""
        ...

    def release(self, kind: SlotKind, key: str, job_id: str) -> bool:
        """Give back a slot (idempotent); True if the job held it."""
        ...

    def move(
        self,
        key: str,
        job_id: str,
        limit: float,
        lease_s: float,
        now: float | None = None,
        *,
        source: SlotKind = "queued",
        target: SlotKind = "running",
    ) -> SlotGrant:
        """Dispatch: atomically take a ``target`` slot (within ``limit``) and give back the
        ``source`` one. When refused, nothing changes (the job keeps its queued slot). The
        job need not still hold its source lease (it may have expired): it is admitted."""
        ...

    def count(self, kind: SlotKind, key: str, now: float | None = None) -> int:
        """Live ``kind`` leases of ``key``."""
        ...

    def slot_counts(self, now: float | None = None) -> dict[str, SlotCounts]:
        """Every key that holds live leases, with its counts: what operators list, across
        all replicas (keys with none are left out)."""
        ...

    # -- rate windows (requests_per_minute) --------------------------------------------

    def admit_rate(self, key: str, job_id: str, limit: float, window_s: float, now: float | None = None) -> RateGrant:
        """Count ``job_id`` in ``key``'s sliding window of ``window_s`` if fewer than
        ``limit`` admissions are in it (idempotent per job id)."""
        ...

    def forget_rate(self, key: str, job_id: str) -> None:
        """Take an admission back out of the window (a later check refused the request)."""
        ...

    # -- fair-queueing service ---------------------------------------------------------

    def add_service(self, flow_id: str, delta: float, *, floor: float | None = None, now: float | None = None) -> float:
        """Atomically ``S = max(S, floor) + delta`` for the flow; returns the new ``S``.

        ``floor`` is the scheduler's "an idle flow restarts at the virtual time" rule;
        ``add_service(name, 0.0, floor=v)`` keeps a shared maximum (a global virtual time)."""
        ...

    def service(self, flow_ids: Iterable[str], now: float | None = None) -> dict[str, float]:
        """The service of each known flow among ``flow_ids`` (unknown ones are left out)."""
        ...

    # -- a job's steps in one call (what a GPU tier with Redis does per job) -----------

    def admit(self, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
        """Every check of ``plan`` and its changes, or none of them: the rate entry, the
        queued lease and the reservations are all taken, or (refused) all left as they
        were. One round trip on Redis (one script, atomic); in steps elsewhere, each
        undone when a later one refuses (:func:`admit_in_steps`)."""
        ...

    def start_job(
        self, key: str, job_id: str, limit: float, lease_s: float, service_delta: float, vtime_key: str,
        now: float | None = None,
    ) -> SlotGrant:
        """Dispatch and charge in one step: :meth:`move` the job's queued lease of ``key``
        to a running one within ``limit``; granted, the flow ``key`` is charged its virtual
        service, ``S = max(S, V) + service_delta``, and the shared virtual time (the counter
        ``vtime_key``) rises to the job's start tag, ``V = max(V, S - service_delta)``.
        Refused, nothing changes. One round trip on Redis."""
        ...

    def settle(
        self, key: str, job_id: str, adjustments: Iterable[tuple[str, float]] = (), *,
        forget_rate: bool = False, service_delta: float = 0.0, now: float | None = None,
    ) -> None:
        """A job is done (ran, or left): give back its queued and running leases of
        ``key``, ``adjust`` each usage key by its delta, add ``service_delta`` to the flow
        ``key``'s service (the measured cost's correction) and with ``forget_rate`` take
        its admission out of ``key``'s rate window. One round trip on Redis."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


class UsageLedger(Protocol):
    """The part of a store that the scheduler and the admin API's reset use: the GPU-second
    windows (any :class:`UsageStore`, or the single tier's ``WriteBehindStore``)."""

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float) -> float | None: ...

    def adjust(self, key: str, delta: float, now: float) -> None: ...

    def usage(self, key: str, now: float) -> tuple[float, float]: ...

    def reset(self, key: str) -> None: ...


class OverrideStore(Protocol):
    """The part of a store that :class:`~gpu_backend.ops.admin.Overrides` uses."""

    def all_overrides(self) -> dict[str, dict[str, Any]]: ...

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None: ...

    def clear_overrides(self, client_id: str) -> None: ...

    def overrides_version(self) -> int: ...


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


def check_rate(limit: float, window_s: float) -> None:
    if math.isnan(limit) or limit < 0 or not window_s > 0:
        raise ValueError(f"bad rate window: limit={limit!r} window_s={window_s!r}")


def check_service(delta: float, floor: float | None) -> None:
    if not math.isfinite(delta) or (floor is not None and not math.isfinite(floor)):
        raise ValueError(f"bad service change: delta={delta!r} floor={floor!r}")


def _reserve(
    window: _Window | None, amount: float, limit: float, window_s: float, now: float
) -> tuple[_Window | None, float | None]:
    """The shared rule: ``(window to store or None to leave as is, retry_after or None)``."""
    if window is None or not window.live(now):
        window = _Window(used=0.0, start=now, window_s=window_s)
    if window.used + amount <= limit + _SLACK:
        window.used += amount
        return window, None
    return None, window.resets_in(now)


def admit_in_steps(store: UsageStore, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
    """:meth:`UsageStore.admit` as its single calls, each undone when a later one
    refuses or fails (the memory and SQLite stores, and Redis' outage fallback)."""
    undo: list[Callable[[], Any]] = []

    def refuse(grant: AdmitGrant) -> AdmitGrant:
        for step in reversed(undo):
            step()
        return grant

    try:
        if plan.rate_limit is not None:
            rate = store.admit_rate(plan.key, plan.job_id, plan.rate_limit, plan.rate_window_s, now)
            if not rate.granted:
                return AdmitGrant(False, "rate", held=rate.held, retry_after_s=rate.retry_after_s)
            undo.append(lambda: store.forget_rate(plan.key, plan.job_id))
        slot = store.acquire_slot("queued", plan.key, plan.job_id, plan.max_queued, plan.lease_s, now)
        if not slot.granted:
            return refuse(AdmitGrant(False, "queued", held=slot.held))
        undo.append(lambda: store.release("queued", plan.key, plan.job_id))
        for i, r in enumerate(plan.reservations):
            retry = store.reserve(r.key, r.amount, r.limit, r.window_s, now)
            if retry is not None:
                used, _ = store.usage(r.key, now)
                return refuse(AdmitGrant(False, "quota", retry_after_s=retry, quota=i, used=used))
            undo.append(lambda r=r: store.adjust(r.key, -r.amount, now))  # type: ignore[misc]
        service = store.service(plan.service, now) if plan.service else {}
    except BaseException:
        for step in reversed(undo):
            try:
                step()
            except StoreUnavailable:
                pass  # expires by itself (a lease, a rate entry) or was never taken
        raise
    return AdmitGrant(True, service=service)


def settle_in_steps(
    store: UsageStore, key: str, job_id: str, adjustments: Iterable[tuple[str, float]] = (), *,
    forget_rate: bool = False, service_delta: float = 0.0, now: float | None = None,
) -> None:
    """:meth:`UsageStore.settle` as its single calls."""
    for kind in SLOT_KINDS:
        store.release(kind, key, job_id)
    for usage_key, delta in adjustments:
        if delta:
            store.adjust(usage_key, delta, now)
    if service_delta:
        store.add_service(key, service_delta, now=now)
    if forget_rate:
        store.forget_rate(key, job_id)


def start_job_in_steps(
    store: UsageStore, key: str, job_id: str, limit: float, lease_s: float, service_delta: float, vtime_key: str,
    now: float | None = None,
) -> SlotGrant:
    """:meth:`UsageStore.start_job` as its single calls (the service charge is not atomic
    with the move: two starts racing may raise ``V`` in either order, which only delays
    it by one of them)."""
    check_service(service_delta, None)
    grant = store.move(key, job_id, limit, lease_s, now)
    if grant.granted:
        vtime = store.service([vtime_key], now).get(vtime_key, 0.0)
        after = store.add_service(key, service_delta, floor=vtime, now=now)
        store.add_service(vtime_key, 0.0, floor=after - service_delta, now=now)
    return grant


class _JobsInSteps:
    """A job's steps in one call, made of the store's own steps (the memory and SQLite
    stores; Redis runs each as one script)."""

    def admit(self: Any, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
        return admit_in_steps(self, plan, now)

    def start_job(
        self: Any, key: str, job_id: str, limit: float, lease_s: float, service_delta: float, vtime_key: str,
        now: float | None = None,
    ) -> SlotGrant:
        return start_job_in_steps(self, key, job_id, limit, lease_s, service_delta, vtime_key, now)

    def settle(
        self: Any, key: str, job_id: str, adjustments: Iterable[tuple[str, float]] = (), *,
        forget_rate: bool = False, service_delta: float = 0.0, now: float | None = None,
    ) -> None:
        settle_in_steps(self, key, job_id, adjustments, forget_rate=forget_rate, service_delta=service_delta, now=now)


class MemoryUsageStore(_JobsInSteps):
    """A :class:`UsageStore` in dicts; thread-safe, lost when the process ends."""

    def __init__(
        self,
        windows: dict[str, _Window] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
    ) -> None:
        self._clock = clock
        self._service_ttl_s = service_ttl_s
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = dict(windows or {})
        self._overrides: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._slots: dict[tuple[str, str], dict[str, float]] = {}  # (kind, key) -> job -> expires
        self._rates: dict[str, dict[str, float]] = {}  # key -> job -> admitted at
        self._service: dict[str, tuple[float, float]] = {}  # flow -> (value, expires)

    def window(self, key: str) -> _Window | None:
        """A copy of ``key``'s window (for ``write_behind.py``, which persists it)."""
        with self._lock:
            w = self._windows.get(key)
            return None if w is None else _Window(w.used, w.start, w.window_s)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    # -- usage -----------------------------------------------------------------------

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float | None = None) -> float | None:
        check_reservation(amount, limit, window_s)
        now = self._now(now)
        with self._lock:
            window, retry = _reserve(self._windows.get(key), amount, limit, window_s, now)
            if window is not None:
                self._windows[key] = window
            return retry

    def adjust(self, key: str, delta: float, now: float | None = None) -> None:
        now = self._now(now)
        with self._lock:
            window = self._windows.get(key)
            if window is not None and window.live(now):
                window.used = max(0.0, window.used + delta)

    def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
        now = self._now(now)
        with self._lock:
            window = self._windows.get(key)
            if window is None or not window.live(now):
                return (0.0, 0.0)
            return (window.used, window.resets_in(now))

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

    # -- overrides -------------------------------------------------------------------

    def get_overrides(self, client_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._overrides.get(client_id, {}))

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

    # -- slots -----------------------------------------------------------------------

    def _live_slots(self, kind: str, key: str, now: float) -> dict[str, float]:
        """The live leases of one set (lock held); expired ones dropped."""
        leases = self._slots.setdefault((kind, key), {})
        for job_id in [j for j, expires in leases.items() if expires <= now]:
            del leases[job_id]
        return leases

    def _tidy(self, kind: str, key: str) -> None:
        if not self._slots.get((kind, key)):
            self._slots.pop((kind, key), None)

    def acquire_slot(
        self, kind: SlotKind, key: str, job_id: str, limit: float, lease_s: float, now: float | None = None
    ) -> SlotGrant:
        check_slot(kind, limit, lease_s)
        now = self._now(now)
        with self._lock:
            leases = self._live_slots(kind, key, now)
            if job_id in leases or len(leases) < limit:
                leases[job_id] = now + lease_s
                return SlotGrant(True, len(leases))
            self._tidy(kind, key)
            return SlotGrant(False, len(leases))

    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> Renewal:
        now = self._now(now)
        renewed: list[Lease] = []
        lost: list[Lease] = []
        with self._lock:
            for lease in leases:
                check_slot(lease.kind, 0, lease_s)
                held = self._live_slots(lease.kind, lease.key, now)
                if lease.job_id in held:
                    held[lease.job_id] = now + lease_s
                    renewed.append(lease)
                else:
                    lost.append(lease)
                    self._tidy(lease.kind, lease.key)
        return Renewal(tuple(renewed), tuple(lost))

    def release(self, kind: SlotKind, key: str, job_id: str) -> bool:
        check_slot(kind, 0, 1.0)
        with self._lock:
            held = self._slots.get((kind, key), {})
            found = held.pop(job_id, None) is not None
            self._tidy(kind, key)
            return found

    def move(
        self,
        key: str,
        job_id: str,
        limit: float,
        lease_s: float,
        now: float | None = None,
        *,
        source: SlotKind = "queued",
        target: SlotKind = "running",
    ) -> SlotGrant:
        check_slot(source, limit, lease_s)
        check_slot(target, limit, lease_s)
        now = self._now(now)
        with self._lock:
            into = self._live_slots(target, key, now)
            if job_id not in into and len(into) >= limit:
                self._tidy(target, key)
                return SlotGrant(False, len(into))
            into[job_id] = now + lease_s
            self._live_slots(source, key, now).pop(job_id, None)
            self._tidy(source, key)
            return SlotGrant(True, len(into))

    def count(self, kind: SlotKind, key: str, now: float | None = None) -> int:
        check_slot(kind, 0, 1.0)
        now = self._now(now)
        with self._lock:
            held = self._slots.get((kind, key), {})
            return sum(1 for expires in held.values() if expires > now)

    def slot_counts(self, now: float | None = None) -> dict[str, SlotCounts]:
        now = self._now(now)
        counts: dict[str, dict[str, int]] = {}
        with self._lock:
            for (kind, key), held in self._slots.items():
                n = sum(1 for expires in held.values() if expires > now)
                if n:
                    counts.setdefault(key, {})[kind] = n
        return {key: SlotCounts(**c) for key, c in counts.items()}

    # -- rate windows ----------------------------------------------------------------

    def admit_rate(self, key: str, job_id: str, limit: float, window_s: float, now: float | None = None) -> RateGrant:
        check_rate(limit, window_s)
        now = self._now(now)
        with self._lock:
            times = self._rates.setdefault(key, {})  # in admission order: the oldest first
            while times and next(iter(times.values())) <= now - window_s:
                del times[next(iter(times))]
            if job_id in times:
                return RateGrant(True, len(times))
            if len(times) < limit:
                times[job_id] = now
                return RateGrant(True, len(times))
            if not times:
                del self._rates[key]
                return RateGrant(False, 0, window_s)
            oldest = next(iter(times.values()))
            return RateGrant(False, len(times), max(0.0, oldest + window_s - now))

    def forget_rate(self, key: str, job_id: str) -> None:
        with self._lock:
            times = self._rates.get(key)
            if times is not None:
                times.pop(job_id, None)
                if not times:
                    del self._rates[key]

    # -- service ---------------------------------------------------------------------

    def add_service(self, flow_id: str, delta: float, *, floor: float | None = None, now: float | None = None) -> float:
        check_service(delta, floor)
        now = self._now(now)
        with self._lock:
            value, expires = self._service.get(flow_id, (0.0, math.inf))
            if expires <= now:
                value = 0.0
            if floor is not None:
                value = max(value, floor)
            value += delta
            self._service[flow_id] = (value, now + self._service_ttl_s)
            return value

    def service(self, flow_ids: Iterable[str], now: float | None = None) -> dict[str, float]:
        now = self._now(now)
        with self._lock:
            found = {f: self._service.get(f) for f in flow_ids}
            return {f: v[0] for f, v in found.items() if v is not None and v[1] > now}

    def close(self) -> None:
        """Nothing to release; here so every store can be closed alike."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT PRIMARY KEY,
    used REAL NOT NULL,
    window_start REAL NOT NULL,
    window_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS overrides (
    client_id TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (kind, key, job_id)
);
CREATE INDEX IF NOT EXISTS slots_expires ON slots (expires);
CREATE TABLE IF NOT EXISTS rates (
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (key, job_id)
);
CREATE INDEX IF NOT EXISTS rates_expires ON rates (expires);
CREATE INDEX IF NOT EXISTS rates_key_at ON rates (key, at);
CREATE TABLE IF NOT EXISTS service (
    flow_id TEXT PRIMARY KEY,
    value REAL NOT NULL,
    expires REAL NOT NULL
);
"""


class SqliteUsageStore(_JobsInSteps):
    """A :class:`UsageStore` in one SQLite file; survives restarts.

    Every read-modify-write runs in a ``BEGIN IMMEDIATE`` transaction, so each check and
    its change are atomic across threads (a lock) and across processes sharing the file
    (SQLite's write lock). WAL mode lets readers go on meanwhile. Expired leases and rate
    entries are deleted by the next write that looks at their table.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._service_ttl_s = service_ttl_s
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; we open them ourselves.
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    # -- helpers ---------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _window(self, key: str) -> _Window | None:
        row = self._db.execute("SELECT used, window_start, window_s FROM usage WHERE key = ?", (key,)).fetchone()
        return None if row is None else _Window(used=row[0], start=row[1], window_s=row[2])

    def _put(self, key: str, window: _Window) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO usage (key, used, window_start, window_s) VALUES (?, ?, ?, ?)",
            (key, window.used, window.start, window.window_s),
        )

    def _write(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def windows(self) -> dict[str, _Window]:
        """Every stored window (``write_behind.py`` loads them at start)."""
        with self._lock:
            rows = self._db.execute("SELECT key, used, window_start, window_s FROM usage").fetchall()
        return {key: _Window(used=u, start=t, window_s=w) for key, u, t, w in rows}

    def write_windows(self, windows: dict[str, _Window | None]) -> None:
        """Store these windows as they are (None deletes), in one transaction."""
        with self._write():
            for key, window in windows.items():
                if window is None:
                    self._db.execute("DELETE FROM usage WHERE key = ?", (key,))
                else:
                    self._put(key, window)

    # -- usage -----------------------------------------------------------------------

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float | None = None) -> float | None:
        check_reservation(amount, limit, window_s)
        now = self._now(now)
        with self._write():
            window, retry = _reserve(self._window(key), amount, limit, window_s, now)
            if window is not None:
                self._put(key, window)
            return retry

    def adjust(self, key: str, delta: float, now: float | None = None) -> None:
        now = self._now(now)
        with self._write():
            window = self._window(key)
            if window is not None and window.live(now):
                window.used = max(0.0, window.used + delta)
                self._put(key, window)

    def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
        now = self._now(now)
        with self._lock:
            window = self._window(key)
        if window is None or not window.live(now):
            return (0.0, 0.0)
        return (window.used, window.resets_in(now))

    def usage_keys(self, now: float | None = None) -> list[str]:
        now = self._now(now)
        with self._lock:
            rows = self._db.execute("SELECT key FROM usage WHERE window_start + window_s > ? ORDER BY key", (now,))
            return [row[0] for row in rows.fetchall()]

    def reset(self, key: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM usage WHERE key = ?", (key,))

    # -- overrides -------------------------------------------------------------------

    def _read_overrides(self, client_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT data FROM overrides WHERE client_id = ?", (client_id,)).fetchone()
        return {} if row is None else dict(json.loads(row[0]))

    def _bump_version(self) -> None:
        self._db.execute(
            "INSERT INTO meta (name, value) VALUES ('overrides_version', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1"
        )

    def get_overrides(self, client_id: str) -> dict[str, Any]:
        with self._lock:
            return self._read_overrides(client_id)

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        with self._write():
            merged = self._read_overrides(client_id)
            merged.update(values)
            self._db.execute(
                "INSERT OR REPLACE INTO overrides (client_id, data) VALUES (?, ?)",
                (client_id, json.dumps(merged, sort_keys=True)),
            )
            self._bump_version()

    def clear_overrides(self, client_id: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM overrides WHERE client_id = ?", (client_id,))
            self._bump_version()

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT client_id, data FROM overrides").fetchall()
        return {cid: dict(json.loads(data)) for cid, data in rows}

    def overrides_version(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = 'overrides_version'").fetchone()
        return 0 if row is None else int(row[0])

    # -- slots -----------------------------------------------------------------------

    def _held(self, kind: str, key: str) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM slots WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return int(row[0])

    def _holds(self, kind: str, key: str, job_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM slots WHERE kind = ? AND key = ? AND job_id = ?", (kind, key, job_id)
        ).fetchone()
        return row is not None

    def _prune_slots(self, now: float) -> None:
        self._db.execute("DELETE FROM slots WHERE expires <= ?", (now,))

    def _put_slot(self, kind: str, key: str, job_id: str, expires: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO slots (kind, key, job_id, expires) VALUES (?, ?, ?, ?)",
            (kind, key, job_id, expires),
        )

    def acquire_slot(
        self, kind: SlotKind, key: str, job_id: str, limit: float, lease_s: float, now: float | None = None
    ) -> SlotGrant:
        check_slot(kind, limit, lease_s)
        now = self._now(now)
        with self._write():
            self._prune_slots(now)
            held = self._held(kind, key)
            if self._holds(kind, key, job_id):
                self._put_slot(kind, key, job_id, now + lease_s)
                return SlotGrant(True, held)
            if held < limit:
                self._put_slot(kind, key, job_id, now + lease_s)
                return SlotGrant(True, held + 1)
            return SlotGrant(False, held)

    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> Renewal:
        now = self._now(now)
        renewed: list[Lease] = []
        lost: list[Lease] = []
        with self._write():
            self._prune_slots(now)
            for lease in leases:
                check_slot(lease.kind, 0, lease_s)
                cur = self._db.execute(
                    "UPDATE slots SET expires = ? WHERE kind = ? AND key = ? AND job_id = ?",
                    (now + lease_s, lease.kind, lease.key, lease.job_id),
                )
                (renewed if cur.rowcount else lost).append(lease)
        return Renewal(tuple(renewed), tuple(lost))

    def release(self, kind: SlotKind, key: str, job_id: str) -> bool:
        check_slot(kind, 0, 1.0)
        with self._write():
            cur = self._db.execute(
                "DELETE FROM slots WHERE kind = ? AND key = ? AND job_id = ?", (kind, key, job_id)
            )
            return cur.rowcount > 0

    def move(
        self,
        key: str,
        job_id: str,
        limit: float,
        lease_s: float,
        now: float | None = None,
        *,
        source: SlotKind = "queued",
        target: SlotKind = "running",
    ) -> SlotGrant:
        check_slot(source, limit, lease_s)
        check_slot(target, limit, lease_s)
        now = self._now(now)
        with self._write():
            self._prune_slots(now)
            held = self._held(target, key)
            already = self._holds(target, key, job_id)
            if not already and held >= limit:
                return SlotGrant(False, held)
            self._put_slot(target, key, job_id, now + lease_s)
            self._db.execute(
                "DELETE FROM slots WHERE kind = ? AND key = ? AND job_id = ?", (source, key, job_id)
            )
            return SlotGrant(True, held if already else held + 1)

    def count(self, kind: SlotKind, key: str, now: float | None = None) -> int:
        check_slot(kind, 0, 1.0)
        now = self._now(now)
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM slots WHERE kind = ? AND key = ? AND expires > ?", (kind, key, now)
            ).fetchone()
        return int(row[0])

    def slot_counts(self, now: float | None = None) -> dict[str, SlotCounts]:
        now = self._now(now)
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, key, COUNT(*) FROM slots WHERE expires > ? GROUP BY kind, key", (now,)
            ).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for kind, key, n in rows:
            counts.setdefault(key, {})[kind] = int(n)
        return {key: SlotCounts(**c) for key, c in counts.items()}

    # -- rate windows ----------------------------------------------------------------

    def admit_rate(self, key: str, job_id: str, limit: float, window_s: float, now: float | None = None) -> RateGrant:
        check_rate(limit, window_s)
        now = self._now(now)
        with self._write():
            self._db.execute("DELETE FROM rates WHERE expires <= ?", (now,))
            self._db.execute("DELETE FROM rates WHERE key = ? AND at <= ?", (key, now - window_s))
            held, oldest = self._db.execute("SELECT COUNT(*), MIN(at) FROM rates WHERE key = ?", (key,)).fetchone()
            if self._db.execute("SELECT 1 FROM rates WHERE key = ? AND job_id = ?", (key, job_id)).fetchone():
                return RateGrant(True, held)
            if held < limit:
                self._db.execute(
                    "INSERT INTO rates (key, job_id, at, expires) VALUES (?, ?, ?, ?)",
                    (key, job_id, now, now + window_s),
                )
                return RateGrant(True, held + 1)
            retry = max(0.0, oldest + window_s - now) if held else window_s
            return RateGrant(False, held, retry)

    def forget_rate(self, key: str, job_id: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM rates WHERE key = ? AND job_id = ?", (key, job_id))

    # -- service ---------------------------------------------------------------------

    def add_service(self, flow_id: str, delta: float, *, floor: float | None = None, now: float | None = None) -> float:
        check_service(delta, floor)
        now = self._now(now)
        with self._write():
            row = self._db.execute(
                "SELECT value FROM service WHERE flow_id = ? AND expires > ?", (flow_id, now)
            ).fetchone()
            value = 0.0 if row is None else float(row[0])
            if floor is not None:
                value = max(value, floor)
            value += delta
            self._db.execute(
                "INSERT OR REPLACE INTO service (flow_id, value, expires) VALUES (?, ?, ?)",
                (flow_id, value, now + self._service_ttl_s),
            )
            self._db.execute("DELETE FROM service WHERE expires <= ?", (now,))
            return value

    def service(self, flow_ids: Iterable[str], now: float | None = None) -> dict[str, float]:
        now = self._now(now)
        wanted = list(dict.fromkeys(flow_ids))
        found: dict[str, float] = {}
        with self._lock:
            for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                part = wanted[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT flow_id, value FROM service WHERE expires > ? AND flow_id IN ({marks})", (now, *part)
                ).fetchall()
                found.update({f: float(v) for f, v in rows})
        return found

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) under the store's lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self._lock.release()
