"""Limits that hold across every GPU tier sharing one Redis (``SPLITSPACE_REDIS_URL``).

Why: each tier's scheduler counts only its own jobs, so N replicas multiply every limit by
N (issue 12). This is the one place a job's way through a tier meets the shared store,
always outside the runner's lock, in three calls (docs/scaling.md, "How a GPU tier uses
Redis"): ``admit`` on the event loop (nonce, rate, queue, quotas; the local scheduler then
runs with those relaxed, :func:`local_limits`), ``start`` on the GPU thread (the running
slot within ``max_running``; a refused flow is held back ``retry_s``) and ``finish``. A
thread renews this replica's leases every ``lease_s / 3``, sends the releases Redis missed
and polls the overrides. Fairness: a flow new to a tier starts at its shared lead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from splitspace.gpu_backend.admission.scheduler import (
    RATE_WINDOW_S,
    ClientRef,
    Job,
    address_usage_key,
    queue_reason,
    quota_reason,
    rate_reason,
)
from splitspace.gpu_backend.stores.resilient_store import RETRY_EVERY_S, ResilientStore
from splitspace.gpu_backend.stores.usage import AdmitGrant, AdmitPlan, Lease, Reservation, SlotKind, StoreUnavailable
from splitspace.session.token import TOKEN_REUSED
from splitspace.shared.contract.admin_api import AddressStanding, ClientStats
from splitspace.shared.contract.errors import QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED, Throttled, Unauthorized
from splitspace.shared.contract.quotas import Tier

log = logging.getLogger("splitspace.gpu")

VTIME_KEY = "__vtime__"
"""The shared virtual time's name among the flows' service counters."""

UNLIMITED_QUEUE = 10**9

CLIENT_PREFIXES = ("key:", "session:", "addr:")
"""How client ids start (``ClientRef.client_id``); other usage keys are address ceilings."""


def local_limits(limits: Callable[[ClientRef], Tier]) -> Callable[[ClientRef], Tier]:
    """The local scheduler's limits: weights and ``max_running``; the rest is checked globally."""

    def relaxed(client: ClientRef) -> Tier:
        return dataclasses.replace(
            limits(client),
            gpu_seconds=math.inf,
            address_gpu_seconds=None,
            requests_per_minute=None,
            max_queued=UNLIMITED_QUEUE,
        )

    return relaxed


@dataclass
class Hold:
    """What one admitted job holds in the store (to release and settle later)."""

    job_id: str
    client: ClientRef
    cost: float
    reserved_address: bool
    kind: SlotKind = "queued"  # until its start, then "running"


def _safely(call: Callable[[], object], what: str) -> None:
    try:
        call()
    except Exception:  # the renewer thread must go on
        log.warning("could not %s", what, exc_info=True)


class GlobalLimits:
    """One tier's side of the shared limits: what it holds in the store, and its calls there."""

    def __init__(
        self,
        *,
        store: ResilientStore,
        limits: Callable[[ClientRef], Tier],
        lease_s: float = 30.0,
        retry_s: float = 0.1,
        on_retry: Callable[[], None] = lambda: None,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_retry``: dispatch again, ``retry_s`` after a refused start; ``on_tick``:
        called about once a second by the renewer thread (the overrides poll)."""
        self.store = store
        self._limits = limits
        self.lease_s = lease_s
        self.retry_s = retry_s
        self._on_retry = on_retry
        self._on_tick = on_tick
        self._holds: dict[str, Hold] = {}
        self._held_until: dict[str, float] = {}
        self._lead: dict[str, float] = {}
        self._lock = threading.Lock()
        self._settler = ThreadPoolExecutor(1, thread_name_prefix="store-settle")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    def limits_for(self, client: ClientRef) -> Tier:
        """The client's global limits (the frontend's in-flight cap comes from them)."""
        return self._limits(client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._settler.shutdown(wait=True)

    async def admit(
        self, client: ClientRef, job_id: str, cost: float, nonce: str = "", nonce_ttl_s: float = 120.0
    ) -> Hold:
        """Check and take every global limit for one job, or raise Throttled,
        ServiceUnavailable or (a ``nonce`` admitted before on any tier) Unauthorized."""
        tier, flow = self._limits(client), client.flow_id
        reservations = [Reservation(client.client_id, cost, tier.gpu_seconds, tier.window_s)]
        if client.is_anonymous and tier.address_gpu_seconds is not None:
            by_address = Reservation(address_usage_key(client.address), cost, tier.address_gpu_seconds, tier.window_s)
            reservations.append(by_address)
        limits = (tier.max_queued, self.lease_s, tuple(reservations), tier.requests_per_minute, RATE_WINDOW_S)
        plan = AdmitPlan(flow, job_id, *limits, (flow, VTIME_KEY), nonce, nonce_ttl_s)
        grant = await self.store.admit_async(plan)
        if grant.refused_by == "replay":
            raise Unauthorized(TOKEN_REUSED)
        if not grant.granted:
            raise self._refusal(grant, plan, tier, cost, flow.startswith("addr:"))
        svc = grant.service
        self._lead[flow] = max(0.0, svc.get(flow, 0.0) - svc.get(VTIME_KEY, 0.0))
        hold = Hold(job_id, client, cost, len(reservations) > 1)
        with self._lock:
            self._holds[job_id] = hold
        return hold

    @staticmethod
    def _refusal(grant: AdmitGrant, plan: AdmitPlan, tier: Tier, cost: float, by_address: bool) -> Throttled:
        """The same titles, reasons and retry seconds as one tier alone."""
        who = "from this address " if by_address else ""
        if grant.refused_by == "rate":
            return Throttled(RATE_LIMITED, rate_reason(grant.held, tier.requests_per_minute, who), grant.retry_after_s)
        if grant.refused_by == "queued":
            return Throttled(QUEUE_FULL, queue_reason(grant.held, tier.max_queued, who), cost)
        name = "gpu_seconds" if grant.quota == 0 else "address_gpu_seconds"
        reason = quota_reason(grant.used, cost, plan.reservations[grant.quota].limit, name)
        return Throttled(QUOTA_EXCEEDED, reason, grant.retry_after_s)

    def refused_locally(self, hold: Hold) -> None:
        """The local runner refused a job admitted globally: give it all back."""
        self._forget(hold.job_id)
        self._settler.submit(self._settle, hold, 0.0, True)

    def dropped(self, job_id: str) -> None:
        """A queued job left without running (its caller went away)."""
        hold = self._forget(job_id)
        if hold is not None:
            self._settler.submit(self._settle, hold, 0.0)

    def held(self, flow_id: str) -> bool:
        """True while a flow waits for its running slot (a refused start); lock held."""
        if self._held_until.get(flow_id, 0.0) > time.monotonic():
            return True
        self._held_until.pop(flow_id, None)
        return False

    def service_floor(self, flow_id: str, vtime: float) -> float:
        """Where a flow that becomes active starts: ``vtime`` plus its shared lead."""
        return vtime + self._lead.pop(flow_id, 0.0)

    def start(self, jobs: list[Job]) -> tuple[list[Job], list[Job], dict[str, BaseException]]:
        """Take a running slot for each job: ``(may run, refused: put back, failed)``."""
        run: list[Job] = []
        refused: list[Job] = []
        failed: dict[str, BaseException] = {}
        for job in jobs:
            tier = self._limits(job.client)
            try:  # the running slot and the flow's shared service, in one store call
                slot = (job.client.flow_id, job.job_id, tier.max_running, self.lease_s)
                grant = self.store.start_job(*slot, job.cost / max(tier.weight, 1e-9), VTIME_KEY)
            except StoreUnavailable as exc:
                failed[job.job_id] = exc
                continue
            if grant.granted:
                with self._lock:
                    hold = self._holds.get(job.job_id)
                    if hold is not None:
                        hold.kind = "running"
                run.append(job)
            else:
                refused.append(job)
                self._held_until[job.client.flow_id] = time.monotonic() + self.retry_s
        if refused:
            timer = threading.Timer(self.retry_s, self._on_retry)
            timer.daemon = True
            timer.start()
        for job_id in failed:
            hold = self._forget(job_id)
            if hold is not None:
                self._settle(hold, 0.0)
        return run, refused, failed

    def finish(self, job: Job, gpu_s: float) -> None:
        """A job ran (or, ``gpu_s`` 0, was withdrawn after its start): release its slot,
        settle its GPU time and correct its flow's service by the measured cost."""
        hold = self._forget(job.job_id)
        if hold is None:
            return
        weight = max(self._limits(job.client).weight, 1e-9)
        self._settle(hold, gpu_s, service_delta=(gpu_s - hold.cost) / weight)

    def _forget(self, job_id: str) -> Hold | None:
        with self._lock:
            return self._holds.pop(job_id, None)

    def _settle(self, hold: Hold, gpu_s: float, rate: bool = False, service_delta: float = 0.0) -> None:
        """Release the job's leases and settle its reservations; never raises."""
        delta = gpu_s - hold.cost
        adjustments = [(hold.client.client_id, delta)]
        if hold.reserved_address:
            adjustments.append((address_usage_key(hold.client.address), delta))
        try:
            self.store.settle(
                hold.client.flow_id, hold.job_id, adjustments, forget_rate=rate, service_delta=service_delta
            )
        except Exception:  # a settlement must never break the GPU thread
            log.warning("could not settle job %s (%s) in the store", hold.job_id[:8], hold.kind, exc_info=True)

    def leases(self) -> list[Lease]:
        with self._lock:
            return [Lease(h.kind, h.client.flow_id, h.job_id) for h in self._holds.values()]

    def _renew_loop(self) -> None:
        every = max(0.05, self.lease_s / 3)
        tick = min(1.0, every)
        next_renew, next_tick = time.monotonic() + every, time.monotonic() + tick
        while not self._stop.wait(RETRY_EVERY_S if len(self.store.unsent) else tick):
            _safely(self.store.send_unsent, "send the releases Redis missed")  # no I/O while it is away
            if time.monotonic() < next_tick - 0.01:  # woken early to send releases
                continue
            next_tick = time.monotonic() + tick
            if time.monotonic() >= next_renew:
                next_renew = time.monotonic() + every
                _safely(self._renew, "renew slot leases")
            _safely(self._on_tick, "run the periodic store task")

    def _renew(self) -> None:
        leases = self.leases()
        if leases and (lost := self.store.renew(leases, self.lease_s).lost):
            log.warning("%d slot leases expired before renewal (a paused process?)", len(lost))

    def global_stats(self, stats: ClientStats, client: ClientRef) -> ClientStats:
        """A client's standing with usage, queued and running across every replica."""
        tier = self._limits(client)
        used, resets_in = self.store.usage(client.client_id)
        out: ClientStats = {**stats, "limits": tier.to_dict(), "used": used, "resets_in_s": resets_in}
        out["remaining"] = max(0.0, tier.gpu_seconds - used)
        if client.is_anonymous and tier.address_gpu_seconds is not None:
            a_used, a_resets = self.store.usage(address_usage_key(client.address))
            a_remaining = max(0.0, tier.address_gpu_seconds - a_used)
            out["address"] = AddressStanding(used=a_used, remaining=a_remaining, resets_in_s=a_resets)
            if a_remaining < out["remaining"]:
                out["remaining"], out["resets_in_s"] = a_remaining, a_resets
        if not client.is_anonymous:  # an address's slots are its flow's, not one session's
            out["queued"] = self.store.count("queued", client.flow_id)
            out["running"] = self.store.count("running", client.flow_id)
        return out

    def slot_keys(self) -> set[str]:
        """Every flow holding a live slot on any replica."""
        return set(self.store.slot_counts())

    def used_keys(self) -> set[str]:
        """Every client with live usage on any replica (not the ``address:IP`` ceilings)."""
        return {k for k in self.store.usage_keys() if k.startswith(CLIENT_PREFIXES)}
