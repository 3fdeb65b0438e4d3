"""Limits that hold across every GPU tier sharing one Redis (``SPLITSPACE_REDIS_URL``).

Why this module exists: each GPU tier's scheduler counts only the jobs it holds, so with
N replicas every per-client limit is multiplied by N (issue 12). The shared counts live
in the Redis store (:mod:`gpu_backend.stores.redis_store`); this module is the one place
that talks to it on a job's way through a tier, always outside the runner's lock (which
the GPU thread shares with admission). The design, step by step: docs/scaling.md, "How a
GPU tier uses Redis". Three store round trips per job (``bench/scaleout.py --part 1``):

*Admission* (:meth:`GlobalLimits.admit`, event loop, before ``GpuRunner.admit``): one
``admit`` checks, atomically on every tier, the call's identity-token nonce (a captured
call replayed to another tier is refused, ``Unauthorized``), ``requests_per_minute``,
``max_queued`` (a queued lease), ``gpu_seconds`` and, for anonymous clients,
``address_gpu_seconds``, and reads the flow's shared service. All are taken or none,
with the same ``Throttled`` titles and retry seconds as one tier alone. The local
scheduler then orders this tier's jobs with those limits relaxed (:func:`local_limits`:
nothing counted twice); ``max_running`` and weights stay.

*Dispatch* (:meth:`GlobalLimits.start`, GPU thread, after the scheduler picked a batch):
``start_job`` turns each queued lease into a running one within ``max_running`` and
charges the flow's shared service. A refused job goes back to the head of its queue and
its flow is held back (:meth:`held`) for ``retry_s``, then dispatched again; so a
``max_running = 1`` client never runs two jobs at once across tiers. A granted job whose
caller left meanwhile is taken back (:meth:`GlobalLimits.withdraw`).

*Finish* (:meth:`GlobalLimits.finish`, after the result went to its caller): one
``settle`` releases the leases, settles the reservations with the measured GPU time and
corrects the flow's service; a queued job dropped by its caller settles too (:meth:`dropped`).

*Leases.* One thread renews every lease this replica holds every ``lease_s / 3``, so a
replica killed mid-job frees its client's slots within ``lease_s`` (30 s); it also sends,
as soon as Redis answers again, the releases of the settlements Redis missed
(:mod:`gpu_backend.stores.unsent_releases`), and polls the overrides' version every second.
(Short leases instead would be lost by any pause longer than them, letting a client past
``max_running``.)

*Fairness across tiers.* A flow that becomes active on a tier starts at that tier's
virtual time plus the lead its shared service has over the shared virtual time
(:meth:`service_floor`, read at admission), so a client served on A is not fresh on B.

*Redis down* is :mod:`gpu_backend.stores.resilient_store`'s (``closed`` or ``local``).
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
from typing import Any

from splitspace.gpu_backend.admission.scheduler import RATE_WINDOW_S, ClientRef, Job, address_usage_key
from splitspace.gpu_backend.stores.resilient_store import ResilientStore
from splitspace.gpu_backend.stores.unsent_releases import RETRY_EVERY_S
from splitspace.gpu_backend.stores.usage import AdmitGrant, AdmitPlan, Lease, Reservation, StoreUnavailable
from splitspace.session.token import TOKEN_REUSED
from splitspace.shared.contract.errors import QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED, Throttled, Unauthorized
from splitspace.shared.contract.quotas import Tier

log = logging.getLogger("splitspace.gpu")

VTIME_KEY = "__vtime__"
"""The shared virtual time's name among the flows' service counters."""

UNLIMITED_QUEUE = 10**9

CLIENT_PREFIXES = ("key:", "session:", "addr:")
"""How client ids start (``ClientRef.client_id``); other usage keys are address ceilings."""


def local_limits(limits: Callable[[ClientRef], Tier]) -> Callable[[ClientRef], Tier]:
    """The local scheduler's limits when the global ones are checked in the store: the
    same weights and ``max_running``, no rate, queue or GPU-second limit (checked once,
    globally)."""

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
    kind: str = "queued"  # "queued" until its move, then "running"


class GlobalLimits:
    def __init__(
        self,
        *,
        store: ResilientStore,
        async_store: Any,
        limits: Callable[[ClientRef], Tier],
        lease_s: float = 30.0,
        retry_s: float = 0.1,
        on_retry: Callable[[], None] = lambda: None,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        """``store``: the sync :class:`~gpu_backend.stores.resilient_store.ResilientStore` (GPU
        thread, renewer); ``async_store``: its event-loop twin (admission); ``on_retry``:
        dispatch again (called ``retry_s`` after a refused move); ``on_tick``: called
        about once a second by the renewer thread (the overrides poll)."""
        self.store = store
        self.async_store = async_store
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
        """The client's limits as configured (the global ones; the local scheduler's are
        relaxed): what the frontend is told as its in-flight cap."""
        return self._limits(client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._settler.shutdown(wait=True)

    # -- admission (event loop) ----------------------------------------------------------
    async def admit(
        self, client: ClientRef, job_id: str, cost: float, nonce: str = "", nonce_ttl_s: float = 120.0
    ) -> Hold:
        """Check and take every global limit for one job (one store call), or raise
        Throttled / ServiceUnavailable with nothing left taken, or Unauthorized when
        ``nonce`` (its identity token's) was admitted before on any tier (kept
        ``nonce_ttl_s``)."""
        tier = self._limits(client)
        flow = client.flow_id
        on_address = client.is_anonymous and tier.address_gpu_seconds is not None
        reservations = [Reservation(client.client_id, cost, tier.gpu_seconds, tier.window_s)]
        if on_address:
            assert tier.address_gpu_seconds is not None
            reservations.append(
                Reservation(address_usage_key(client.address), cost, tier.address_gpu_seconds, tier.window_s)
            )
        plan = AdmitPlan(
            key=flow,
            job_id=job_id,
            max_queued=tier.max_queued,
            lease_s=self.lease_s,
            reservations=tuple(reservations),
            rate_limit=tier.requests_per_minute,
            rate_window_s=RATE_WINDOW_S,
            service=(flow, VTIME_KEY),
            nonce=nonce,
            nonce_ttl_s=nonce_ttl_s,
        )
        grant = await self.async_store.admit(plan)
        if grant.refused_by == "replay":
            raise Unauthorized(TOKEN_REUSED)
        if not grant.granted:
            raise self._refusal(grant, plan, tier, cost, flow.startswith("addr:"))
        svc = grant.service
        self._lead[flow] = max(0.0, svc.get(flow, 0.0) - svc.get(VTIME_KEY, 0.0))
        hold = Hold(job_id, client, cost, on_address)
        with self._lock:
            self._holds[job_id] = hold
        return hold

    @staticmethod
    def _refusal(grant: AdmitGrant, plan: AdmitPlan, tier: Tier, cost: float, by_address: bool) -> Throttled:
        """The same titles, reasons and retry seconds as one tier alone."""
        who = "from this address " if by_address else ""
        if grant.refused_by == "rate":
            return Throttled(
                RATE_LIMITED,
                f"{grant.held} requests {who}in the last {RATE_WINDOW_S:g} s "
                f"(requests_per_minute={tier.requests_per_minute})",
                grant.retry_after_s,
            )
        if grant.refused_by == "queued":
            return Throttled(
                QUEUE_FULL, f"{grant.held} requests {who}already queued (max_queued={tier.max_queued})", cost
            )
        name = "gpu_seconds" if grant.quota == 0 else "address_gpu_seconds"
        limit = plan.reservations[grant.quota].limit
        scope = "by this address " if name == "address_gpu_seconds" else ""
        if cost > limit:
            reason = f"this request needs {cost:.1f} GPU-seconds, more than the whole quota ({name}={limit:g})"
        else:
            reason = f"{grant.used:.1f} of {limit:g} GPU-seconds used {scope}in this window ({name}={limit:g})"
        return Throttled(QUOTA_EXCEEDED, reason, grant.retry_after_s)

    def refused_locally(self, hold: Hold) -> None:
        """The local runner refused a job the global checks admitted: give it all back."""
        self._forget(hold.job_id)
        self._settler.submit(self._settle, hold, "queued", 0.0, True)

    def dropped(self, job_id: str) -> None:
        """A queued job left without running (its caller went away)."""
        hold = self._forget(job_id)
        if hold is not None:
            self._settler.submit(self._settle, hold, "queued", 0.0)

    # -- the scheduler's hooks (under the runner's lock: memory only) --------------------
    def held(self, flow_id: str) -> bool:
        """True while a flow waits for its running slot elsewhere (a refused move)."""
        until = self._held_until.get(flow_id)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        self._held_until.pop(flow_id, None)
        return False

    def service_floor(self, flow_id: str, vtime: float) -> float:
        """Where a flow that becomes active starts: this tier's virtual time plus the
        lead its shared service has over the shared virtual time."""
        return vtime + self._lead.pop(flow_id, 0.0)

    # -- dispatch and finish (GPU thread, outside the lock) ------------------------------
    def start(self, jobs: list[Job]) -> tuple[list[Job], list[Job], dict[str, BaseException]]:
        """Take a running slot for each job: ``(may run, refused: put back, failed)``."""
        run: list[Job] = []
        refused: list[Job] = []
        failed: dict[str, BaseException] = {}
        for job in jobs:
            tier = self._limits(job.client)
            try:  # the running slot and the flow's shared service, in one store call
                grant = self.store.start_job(
                    job.client.flow_id,
                    job.job_id,
                    tier.max_running,
                    self.lease_s,
                    job.cost / max(tier.weight, 1e-9),
                    VTIME_KEY,
                )
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
                self._settle(hold, "queued", 0.0)
        return run, refused, failed

    def finish(self, job: Job, gpu_s: float) -> None:
        """A job ran: release its running slot, settle its GPU time and correct its flow's
        shared service by the measured cost (one store call)."""
        hold = self._forget(job.job_id)
        if hold is None:
            return
        weight = max(self._limits(job.client).weight, 1e-9)
        self._settle(hold, "running", gpu_s, service_delta=(gpu_s - hold.cost) / weight)

    def withdraw(self, job: Job) -> None:
        """A job granted its start whose caller left before it ran (the runner's drop came
        while :meth:`start` was deciding): release its running slot, give back its
        reservation and take back its flow's service charge, ``-cost / weight`` (one
        ``settle``). It follows the start at once, so it reaches the side that charged it:
        Redis, or memory while the breaker is open after Redis failed to answer. It is a
        finish that measured no GPU time."""
        self.finish(job, 0.0)

    # -- bookkeeping ---------------------------------------------------------------------
    def _forget(self, job_id: str) -> Hold | None:
        with self._lock:
            return self._holds.pop(job_id, None)

    def _settle(self, hold: Hold, kind: str, gpu_s: float, rate: bool = False, service_delta: float = 0.0) -> None:
        """Release the job's leases and settle its reservations, in one store call (never
        raises). ``kind`` is the lease it holds now (both are given back either way)."""
        delta = gpu_s - hold.cost
        adjustments = [(hold.client.client_id, delta)]
        if hold.reserved_address:
            adjustments.append((address_usage_key(hold.client.address), delta))
        try:
            self.store.settle(
                hold.client.flow_id, hold.job_id, adjustments, forget_rate=rate, service_delta=service_delta
            )
        except Exception:  # a settlement must never break the GPU thread
            log.warning("could not settle job %s (%s) in the store", hold.job_id[:8], kind, exc_info=True)

    def leases(self) -> list[Lease]:
        with self._lock:
            return [Lease(h.kind, h.client.flow_id, h.job_id) for h in self._holds.values()]  # type: ignore[arg-type]

    def _renew_loop(self) -> None:
        every = max(0.05, self.lease_s / 3)
        tick = min(1.0, every)
        next_renew, next_tick = time.monotonic() + every, time.monotonic() + tick
        while not self._stop.wait(RETRY_EVERY_S if len(self.store.unsent) else tick):
            try:  # the releases Redis missed, as soon as it answers (no I/O while it is away)
                self.store.send_unsent()
            except Exception:
                log.warning("could not send the releases Redis missed", exc_info=True)
            if time.monotonic() < next_tick - 0.01:  # woken early to send releases
                continue
            next_tick = time.monotonic() + tick
            if time.monotonic() >= next_renew:
                next_renew = time.monotonic() + every
                leases = self.leases()
                if leases:
                    try:
                        lost = self.store.renew(leases, self.lease_s).lost
                        if lost:
                            log.warning("%d slot leases expired before renewal (a paused process?)", len(lost))
                    except Exception:
                        log.warning("could not renew slot leases", exc_info=True)
            try:
                self._on_tick()
            except Exception:
                log.warning("periodic store task failed", exc_info=True)

    # -- what operators see --------------------------------------------------------------
    def global_stats(self, stats: dict[str, Any], client: ClientRef) -> dict[str, Any]:
        """A client's standing (the scheduler's ``client_stats``) with the global figures:
        usage from the store, queued and running across every replica."""
        tier = self._limits(client)
        out = dict(stats)
        out["limits"] = tier.to_dict()
        try:
            used, resets_in = self.store.usage(client.client_id)
            out["used"], out["resets_in_s"] = used, resets_in
            out["remaining"] = max(0.0, tier.gpu_seconds - used)
            if client.is_anonymous and tier.address_gpu_seconds is not None:
                a_used, a_resets = self.store.usage(address_usage_key(client.address))
                a_remaining = max(0.0, tier.address_gpu_seconds - a_used)
                out["address"] = {"used": a_used, "remaining": a_remaining, "resets_in_s": a_resets}
                if a_remaining < out["remaining"]:
                    out["remaining"], out["resets_in_s"] = a_remaining, a_resets
            if not client.is_anonymous:  # an address's slots are its flow's, not one session's
                out["queued"] = self.store.count("queued", client.flow_id)
                out["running"] = self.store.count("running", client.flow_id)
        except StoreUnavailable:
            out["store"] = "unavailable"
        return out

    def slot_keys(self) -> set[str]:
        """Every flow holding a live slot on any replica."""
        try:
            return set(self.store.slot_counts())
        except StoreUnavailable:
            return set()

    def used_keys(self) -> set[str]:
        """Every client with usage in its live window, whichever replica spent it (an
        address' shared ceiling, ``address:IP``, is no client and is left out)."""
        try:
            keys = self.store.usage_keys()
        except StoreUnavailable:
            return set()
        return {k for k in keys if k.startswith(CLIENT_PREFIXES)}
