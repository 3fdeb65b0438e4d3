"""Fair queueing of GPU jobs per client, with per-client limits: the pure core.

Why hand-written: no well-kept Python library does weighted fair queueing over
per-client jobs with admission limits and GPU-second quotas. Kubernetes' API Priority
and Fairness (APF) is the model followed here, but it is Go and schedules in-process
requests by seat count; Python task queues (Celery, RQ, arq) are FIFO with global
rate limits. The algorithm is small; it is kept a plain synchronous data structure whose
only notion of time is the injected ``clock``, so tests drive it in virtual time and
the asyncio glue that runs it stays thin and separate.

The algorithm (compare APF's ``queueset/doc.go``)
-------------------------------------------------

*Flows.* Jobs wait in per-flow queues. An API key is its own flow. Anonymous clients
(browser sessions and bare addresses) are grouped by address: every session from one IP
joins the flow ``addr:IP``, so minting new session cookies never buys a larger share.
Inside a flow each client has its own FIFO queue.

*Virtual service.* Each flow ``f`` has a virtual service counter ``S_f`` in
GPU-seconds divided by its weight. Dispatching a job of estimated cost ``c`` charges
``S_f += c / w_f`` up front; when the job finishes with measured GPU time ``g`` the
charge is corrected by ``(g - c) / w_f``, so service is counted in GPU time actually used.
The system virtual time ``V`` is the largest start tag seen (the ``S_f`` of a flow just
before it was charged for a dispatched job). A flow that becomes active after being idle
(nothing queued, nothing running) starts at ``S_f = max(S_f, V)``: an idle client cannot
bank credit and then monopolise the GPU.

*Dispatch.* While a capacity slot is free, pick the eligible flow with the least
``S_f`` (ties: the earlier head submission) and start its next job. Within the flow the
client with the least per-client service goes first (the same rule one level down,
with the flow's own virtual time), so a flow's share is split among its sessions. A flow
is eligible while its running jobs are below ``max_running`` (per key, or per address
for anonymous clients). Dispatch is work-conserving: if any eligible job waits and a slot
is free, something starts. With ``max_batch > 1`` further queued jobs with the same
``batch_key`` from other clients join the first one, in fair order, each charged its own
cost; the whole batch occupies one slot.

With equal costs and weights this is round-robin over flows; with weights ``1:3`` the
second flow gets three times the GPU time while both are backlogged; a flow that wants
less than its share gets all it wants (max-min fairness).

*Admission* (:meth:`FairScheduler.submit`) checks, in order: duplicate job id,
``requests_per_minute`` (sliding 60 s, per flow), ``max_queued`` (per flow), then
reserves the estimated GPU-seconds in the :class:`~gpu_backend.usage.UsageStore`, for the
client and, for anonymous clients, also for the address's shared ceiling
``address_gpu_seconds``. A refusal says which limit and how long until a retry can
succeed. ``limits(client)`` is asked at every admission and dispatch, so operator
changes apply at the next one.

*Positions.* :meth:`FairScheduler.position` replays the rule above over the queued jobs
(ignoring ``max_running``) to give each waiter its place and an ETA; the replay is cached
until the state changes, because every waiter polls it.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable

from shared.quotas import Tier

if TYPE_CHECKING:
    from .usage import UsageStore

__all__ = [
    "Outcome",
    "ClientRef",
    "Admission",
    "Job",
    "FairScheduler",
    "address_usage_key",
    "RATE_WINDOW_S",
    "MIN_COST",
]

RATE_WINDOW_S = 60.0
"""The sliding window of ``requests_per_minute``."""

MIN_COST = 1e-6
"""Costs are clamped up to this, so every job advances its flow's virtual service."""


def address_usage_key(address: str) -> str:
    """The usage-store key of an address's shared ceiling (``address_gpu_seconds``).

    Kept apart from the per-client key ``addr:IP`` of a cookieless caller, so that the
    address's own use and the total of all its sessions are counted separately.
    """
    return f"address:{address}"


class Outcome(enum.Enum):
    """What :meth:`FairScheduler.submit` decided."""

    ADMITTED = "admitted"
    QUEUE_FULL = "queue_full"
    QUOTA_EXCEEDED = "quota_exceeded"
    RATE_LIMITED = "rate_limited"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class ClientRef:
    """Who asks: the verified identity the frontend forwarded."""

    client_id: str  # "key:NAME" | "session:ID" | "addr:IP"
    kind: str  # "key" | "session" | "address"
    tier: str
    address: str

    @property
    def flow_id(self) -> str:
        """API keys are their own flow; anonymous clients share their address's flow."""
        return self.client_id if self.kind == "key" else f"addr:{self.address}"

    @property
    def is_anonymous(self) -> bool:
        return self.kind != "key"


@dataclass(frozen=True)
class Admission:
    """The answer to a submit: admitted, or which limit refused it and when to retry."""

    outcome: Outcome
    retry_after_s: float = 0.0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.ADMITTED


@dataclass
class Job:
    """One request for GPU work."""

    job_id: str
    client: ClientRef
    cost: float  # estimated GPU-seconds
    batch_key: Hashable | None
    submitted_at: float
    started_at: float | None = None
    reserved: float = 0.0  # GPU-seconds reserved in the usage store
    reserved_address: bool = False  # also reserved against the address's ceiling
    seq: int = 0  # admission order; breaks ties between equal submission times


# --------------------------------------------------------------------------------------
# Internal state


@dataclass
class _Member:
    """One client inside a flow: its FIFO queue and its service within the flow."""

    client: ClientRef
    service: float = 0.0
    queue: deque[Job] = field(default_factory=deque)
    running: int = 0


@dataclass
class _Flow:
    flow_id: str
    service: float = 0.0  # S_f: virtual GPU-seconds (GPU-s / weight)
    inner_v: float = 0.0  # virtual time among the flow's clients
    weight: float = 1.0  # last weight seen (used by position replay)
    members: dict[str, _Member] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    admitted_at: deque[float] = field(default_factory=deque)  # for requests_per_minute

    @property
    def idle(self) -> bool:
        return self.queued == 0 and self.running == 0


@dataclass
class _Running:
    job: Job
    weight: float
    unit: int


@dataclass
class _Order:
    """The cached replay of the fair order over queued jobs."""

    version: int
    places: dict[str, int]  # job_id -> 0-based place
    ahead_cost: dict[str, float]  # job_id -> sum of costs of the jobs before it


class _SimFlow:
    """A copy of one flow's queues and service counters, for replaying the fair order."""

    def __init__(self, flow: _Flow) -> None:
        self.flow_id = flow.flow_id
        self.service = flow.service
        self.weight = max(flow.weight, MIN_COST)
        self.members = {cid: (m.service, deque(m.queue)) for cid, m in flow.members.items() if m.queue}

    def _head(self) -> str:
        def key(cid: str) -> tuple[float, float, int]:
            service, queue = self.members[cid]
            return (service, queue[0].submitted_at, queue[0].seq)

        return min(self.members, key=key)

    def rank(self) -> tuple[float, float, int, str]:
        head = self.members[self._head()][1][0]
        return (self.service, head.submitted_at, head.seq, self.flow_id)

    def pop(self) -> Job:
        """Take the next job, charging it as dispatch would."""
        cid = self._head()
        service, queue = self.members[cid]
        job = queue.popleft()
        charge = job.cost / self.weight
        self.service += charge
        if queue:
            self.members[cid] = (service + charge, queue)
        else:
            del self.members[cid]
        return job


class FairScheduler:
    """Weighted fair queueing of GPU jobs over clients; see the module docstring."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        limits: Callable[[ClientRef], Tier],
        store: UsageStore,
        capacity: int = 1,
    ) -> None:
        self._clock = clock
        self._limits = limits
        self._store = store
        self.capacity = capacity
        self._vtime = 0.0  # V
        self._flows: dict[str, _Flow] = {}
        self._queued: dict[str, Job] = {}
        self._running: dict[str, _Running] = {}
        self._units: dict[int, set[str]] = {}  # running dispatch units (one slot each)
        self._unit_ids = itertools.count()
        self._job_seq = itertools.count()
        self._seen: dict[str, ClientRef] = {}  # every client seen in this process
        self._version = 0
        self._order: _Order | None = None

    # -- size ------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Dispatch units (GPU slots) that may run at once."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"capacity must be at least 1, got {value!r}")
        self._capacity = int(value)

    @property
    def free_slots(self) -> int:
        return max(0, self._capacity - len(self._units))

    @property
    def running_count(self) -> int:
        """Jobs running (a batch counts each of its jobs)."""
        return len(self._running)

    def __len__(self) -> int:
        """Jobs queued."""
        return len(self._queued)

    # -- admission -------------------------------------------------------------------

    def submit(self, job_id: str, client: ClientRef, cost: float, batch_key: Hashable | None = None) -> Admission:
        """Admit a job into its client's queue, or say which limit refuses it."""
        if job_id in self._queued or job_id in self._running:
            return Admission(Outcome.DUPLICATE, 0.0, f"job {job_id!r} is already queued or running")
        now = self._clock()
        cost = max(float(cost), MIN_COST)
        tier = self._limits(client)
        self._seen[client.client_id] = client
        flow = self._flows.get(client.flow_id) or _Flow(client.flow_id)

        refused = self._check_rate(flow, tier, now) or self._check_queue(flow, tier)
        if refused is not None:
            return refused
        job = Job(job_id=job_id, client=client, cost=cost, batch_key=batch_key, submitted_at=now, seq=next(self._job_seq))
        refused = self._reserve(job, tier, now)
        if refused is not None:
            return refused

        if flow.idle:
            flow.service = max(flow.service, self._vtime)
        self._flows[flow.flow_id] = flow
        flow.weight = tier.weight
        member = flow.members.get(client.client_id)
        if member is None:
            member = flow.members[client.client_id] = _Member(client)
        if not member.queue and member.running == 0:
            member.service = max(member.service, flow.inner_v)
        member.client = client
        member.queue.append(job)
        flow.queued += 1
        flow.admitted_at.append(now)
        self._queued[job_id] = job
        self._changed()
        return Admission(Outcome.ADMITTED)

    def _check_rate(self, flow: _Flow, tier: Tier, now: float) -> Admission | None:
        rpm = tier.requests_per_minute
        if rpm is None:
            return None
        times = flow.admitted_at
        while times and times[0] <= now - RATE_WINDOW_S:
            times.popleft()
        if len(times) < rpm:
            return None
        retry = times[0] + RATE_WINDOW_S - now if times else RATE_WINDOW_S
        who = "from this address " if flow.flow_id.startswith("addr:") else ""
        return Admission(
            Outcome.RATE_LIMITED,
            max(0.0, retry),
            f"{len(times)} requests {who}in the last {RATE_WINDOW_S:g} s (requests_per_minute={rpm})",
        )

    def _check_queue(self, flow: _Flow, tier: Tier) -> Admission | None:
        if flow.queued < tier.max_queued:
            return None
        first = min(
            (m.queue[0] for m in flow.members.values() if m.queue),
            key=lambda job: self._place(job.job_id),
            default=None,
        )
        retry = 0.0
        if first is not None:
            place = self.position(first.job_id)
            retry = max(place[1] if place else 0.0, first.cost)
        who = "from this address " if flow.flow_id.startswith("addr:") else ""
        return Admission(
            Outcome.QUEUE_FULL,
            retry,
            f"{flow.queued} requests {who}already queued (max_queued={tier.max_queued})",
        )

    def _reserve(self, job: Job, tier: Tier, now: float) -> Admission | None:
        """Reserve ``job.cost`` for the client (and its address); a refusal if over quota."""
        client = job.client
        retry = self._store.reserve(client.client_id, job.cost, tier.gpu_seconds, tier.window_s, now)
        if retry is not None:
            return self._quota_refusal(client.client_id, job.cost, tier.gpu_seconds, "gpu_seconds", retry, now)
        job.reserved = job.cost
        if client.is_anonymous and tier.address_gpu_seconds is not None:
            key = address_usage_key(client.address)
            retry = self._store.reserve(key, job.cost, tier.address_gpu_seconds, tier.window_s, now)
            if retry is not None:
                self._store.adjust(client.client_id, -job.cost, now)
                job.reserved = 0.0
                return self._quota_refusal(key, job.cost, tier.address_gpu_seconds, "address_gpu_seconds", retry, now)
            job.reserved_address = True
        return None

    def _quota_refusal(self, key: str, cost: float, limit: float, name: str, retry: float, now: float) -> Admission:
        used, _ = self._store.usage(key, now)
        scope = "by this address " if name == "address_gpu_seconds" else ""
        if cost > limit:
            reason = f"this request needs {cost:.1f} GPU-seconds, more than the whole quota ({name}={limit:g})"
        else:
            reason = f"{used:.1f} of {limit:g} GPU-seconds used {scope}in this window ({name}={limit:g})"
        return Admission(Outcome.QUOTA_EXCEEDED, max(0.0, retry), reason)

    # -- dispatch --------------------------------------------------------------------

    def dispatch(self, max_batch: int = 1) -> list[Job]:
        """Start the next dispatch unit: one job, or a batch sharing one slot.

        Returns the started jobs (empty when no slot is free or nothing eligible waits);
        call again while it returns jobs.
        """
        if self.free_slots <= 0 or not self._queued:
            return []
        limits = _Memo(self._limits)
        head = self._pick(limits, batch_key=None, exclude=set())
        if head is None:
            return []
        unit = next(self._unit_ids)
        batch = [self._start(head, limits, unit)]
        if max_batch > 1 and batch[0].batch_key is not None:
            taken = {batch[0].client.client_id}
            while len(batch) < max_batch:
                pick = self._pick(limits, batch_key=batch[0].batch_key, exclude=taken)
                if pick is None:
                    break
                batch.append(self._start(pick, limits, unit))
                taken.add(batch[-1].client.client_id)
        self._units[unit] = {job.job_id for job in batch}
        self._collect_idle()
        self._changed()
        return batch

    def _pick(self, limits: "_Memo", batch_key: Hashable | None, exclude: set[str]) -> tuple[_Flow, _Member, Job] | None:
        """The next job by the fair rule among eligible flows (optionally one batch key)."""
        best: tuple[tuple[float, float, int], _Flow, _Member, Job] | None = None
        for flow in self._flows.values():
            if flow.queued == 0:
                continue
            for member, job in self._candidates(flow, batch_key, exclude):
                tier = limits(member.client)
                if flow.running >= tier.max_running:
                    continue
                rank = (flow.service, job.submitted_at, job.seq)
                if best is None or rank < best[0]:
                    best = (rank, flow, member, job)
                break  # only the flow's first eligible client competes
        return None if best is None else best[1:]

    @staticmethod
    def _candidates(flow: _Flow, batch_key: Hashable | None, exclude: set[str]) -> Iterable[tuple[_Member, Job]]:
        """The flow's clients in their inner fair order, each with the job it would run."""
        found: list[tuple[float, float, int, _Member, Job]] = []
        for cid, member in flow.members.items():
            if not member.queue or cid in exclude:
                continue
            if batch_key is None:
                job = member.queue[0]
            else:
                job = next((j for j in member.queue if j.batch_key == batch_key), None)
                if job is None:
                    continue
            found.append((member.service, job.submitted_at, job.seq, member, job))
        found.sort(key=lambda item: item[:3])
        return [(member, job) for *_, member, job in found]

    def _start(self, pick: tuple[_Flow, _Member, Job], limits: "_Memo", unit: int) -> Job:
        flow, member, job = pick
        weight = max(limits(member.client).weight, MIN_COST)
        flow.weight = weight
        self._vtime = max(self._vtime, flow.service)
        flow.inner_v = max(flow.inner_v, member.service)
        flow.service += job.cost / weight
        member.service += job.cost / weight
        member.queue.remove(job)
        flow.queued -= 1
        flow.running += 1
        member.running += 1
        del self._queued[job.job_id]
        job.started_at = self._clock()
        self._running[job.job_id] = _Running(job, weight, unit)
        return job

    # -- finish and cancel -----------------------------------------------------------

    def finish(self, job_id: str, gpu_s: float) -> None:
        """Settle a running job with its measured GPU time and free its slot.

        A job id that is not running is ignored (finishing twice is harmless).
        """
        entry = self._running.pop(job_id, None)
        if entry is None:
            return
        job, now = entry.job, self._clock()
        gpu_s = max(0.0, float(gpu_s))
        flow = self._flows[job.client.flow_id]
        member = flow.members[job.client.client_id]
        correction = (gpu_s - job.cost) / entry.weight
        flow.service += correction
        member.service += correction
        flow.running -= 1
        member.running -= 1
        self._settle(job, gpu_s, now)
        unit = self._units[entry.unit]
        unit.discard(job_id)
        if not unit:
            del self._units[entry.unit]
        self._changed()

    def cancel(self, job_id: str) -> bool:
        """Remove a queued job and release its reservation; False if running or unknown."""
        job = self._queued.pop(job_id, None)
        if job is None:
            return False
        flow = self._flows[job.client.flow_id]
        flow.members[job.client.client_id].queue.remove(job)
        flow.queued -= 1
        self._settle(job, 0.0, self._clock())
        self._changed()
        return True

    def _settle(self, job: Job, gpu_s: float, now: float) -> None:
        delta = gpu_s - job.reserved
        if delta:
            self._store.adjust(job.client.client_id, delta, now)
            if job.reserved_address:
                self._store.adjust(address_usage_key(job.client.address), delta, now)
        job.reserved = gpu_s

    def _collect_idle(self) -> None:
        """Forget idle flows and clients whose service is behind virtual time (no state lost:
        they would restart there anyway), unless the flow's rate window still counts requests."""
        now = self._clock()
        for flow_id, flow in list(self._flows.items()):
            recent = flow.admitted_at and flow.admitted_at[-1] > now - RATE_WINDOW_S
            if flow.idle and flow.service <= self._vtime and not recent:
                del self._flows[flow_id]
        for flow in self._flows.values():
            for cid in [c for c, m in flow.members.items() if not m.queue and not m.running and m.service <= flow.inner_v]:
                del flow.members[cid]

    # -- positions -------------------------------------------------------------------

    def position(self, job_id: str) -> tuple[int, float] | None:
        """``(1-based place in dispatch order, ETA seconds until start)``; None if not queued."""
        if job_id not in self._queued:
            return None
        order = self._replay()
        running_left = 0.0
        now = self._clock()
        for members in self._units.values():
            jobs = [self._running[j].job for j in members]
            started = min(now if j.started_at is None else j.started_at for j in jobs)
            running_left += max(0.0, started + max(j.cost for j in jobs) - now)
        eta = (running_left + order.ahead_cost[job_id]) / self._capacity
        return order.places[job_id] + 1, eta

    def _place(self, job_id: str) -> int:
        return self._replay().places.get(job_id, len(self._queued))

    def _replay(self) -> _Order:
        """Replay the fair rule over the queued jobs (ignoring max_running); cached."""
        if self._order is not None and self._order.version == self._version:
            return self._order
        places: dict[str, int] = {}
        ahead: dict[str, float] = {}
        total = 0.0
        sims: dict[str, _SimFlow] = {}
        heap: list[tuple[float, float, int, str]] = []
        for flow in self._flows.values():
            if flow.queued:
                sim = sims[flow.flow_id] = _SimFlow(flow)
                heap.append(sim.rank())
        heapq.heapify(heap)
        while heap:
            sim = sims[heapq.heappop(heap)[-1]]
            job = sim.pop()
            places[job.job_id] = len(places)
            ahead[job.job_id] = total
            total += job.cost
            if sim.members:
                heapq.heappush(heap, sim.rank())
        self._order = _Order(self._version, places, ahead)
        return self._order

    def _changed(self) -> None:
        self._version += 1

    # -- reporting -------------------------------------------------------------------

    def limits_for(self, client: ClientRef) -> Tier:
        """The limits in force for ``client`` now (tier, file and operator overrides)."""
        return self._limits(client)

    def client_stats(self, client: ClientRef | str) -> dict[str, Any]:
        """One client's standing: queued, running, used, remaining, resets_in_s, limits, tier.

        Pass the :class:`ClientRef` for a client this process may not have seen yet; a
        bare id of an unseen client is looked up with the anonymous tier.
        """
        ref = client if isinstance(client, ClientRef) else self._seen.get(client) or _guess_ref(client)
        now = self._clock()
        tier = self._limits(ref)
        used, resets_in = self._store.usage(ref.client_id, now)
        remaining = max(0.0, tier.gpu_seconds - used)
        member = None
        flow = self._flows.get(ref.flow_id)
        if flow is not None:
            member = flow.members.get(ref.client_id)
        stats: dict[str, Any] = {
            "client": ref.client_id,
            "client_id": ref.client_id,
            "kind": ref.kind,
            "tier": ref.tier,
            "limits": tier.to_dict(),
            "queued": len(member.queue) if member else 0,
            "running": member.running if member else 0,
            "used": used,
            "remaining": remaining,
            "resets_in_s": resets_in,
        }
        if ref.is_anonymous and tier.address_gpu_seconds is not None:
            a_used, a_resets = self._store.usage(address_usage_key(ref.address), now)
            a_remaining = max(0.0, tier.address_gpu_seconds - a_used)
            stats["address"] = {"used": a_used, "remaining": a_remaining, "resets_in_s": a_resets}
            if a_remaining < remaining:
                stats["remaining"], stats["resets_in_s"] = a_remaining, a_resets
        return stats

    def clients(self) -> list[dict[str, Any]]:
        """Stats of every client queued, running, or with usage in its live window."""
        out = []
        now = self._clock()
        for cid, ref in list(self._seen.items()):
            flow = self._flows.get(ref.flow_id)
            member = flow.members.get(cid) if flow else None
            active = member is not None and (member.queue or member.running)
            if not active and self._store.usage(cid, now)[0] <= 0:
                del self._seen[cid]  # nothing to report; forget it
                continue
            out.append(self.client_stats(ref))
        return out

    def depth_by_tier(self) -> dict[str, tuple[int, int]]:
        """``tier -> (queued, running)`` jobs."""
        depth: dict[str, list[int]] = {}
        for job in self._queued.values():
            depth.setdefault(job.client.tier, [0, 0])[0] += 1
        for entry in self._running.values():
            depth.setdefault(entry.job.client.tier, [0, 0])[1] += 1
        return {tier: (q, r) for tier, (q, r) in depth.items()}


class _Memo:
    """``limits`` asked at most once per client within one dispatch."""

    def __init__(self, limits: Callable[[ClientRef], Tier]) -> None:
        self._limits = limits
        self._cache: dict[ClientRef, Tier] = {}

    def __call__(self, client: ClientRef) -> Tier:
        tier = self._cache.get(client)
        if tier is None:
            tier = self._cache[client] = self._limits(client)
        return tier


def _guess_ref(client_id: str) -> ClientRef:
    kind, _, rest = client_id.partition(":")
    kind = {"key": "key", "session": "session", "addr": "address"}.get(kind, "address")
    return ClientRef(client_id=client_id, kind=kind, tier="anonymous", address=rest if kind == "address" else "")
