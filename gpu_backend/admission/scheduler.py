"""Fair queueing of GPU jobs per client, with per-client limits: the pure core.

Why hand-written: no well-kept Python library does weighted fair queueing over
per-client jobs with admission limits and GPU-second quotas. Kubernetes' API Priority
and Fairness (APF) is the model followed here, but it is Go and schedules in-process
requests by seat count; Python task queues (Celery, RQ, arq) are FIFO with global
rate limits. The algorithm is small; it is kept a plain synchronous data structure whose
only notion of time is the injected ``clock``, so tests drive it in virtual time and
the asyncio glue that runs it stays thin and separate. The ordered structures are
``sortedcontainers.SortedList`` (a well-kept B-tree-like list), not a hand-written tree.

The algorithm (compare APF's ``queueset/doc.go``)
-------------------------------------------------

*Flows.* Jobs wait in per-flow queues. An API key is its own flow. Anonymous clients
(browser sessions and bare addresses) are grouped by address: every session from one IP
joins the flow ``addr:IP``, so minting new session cookies never buys a larger share.
Inside a flow each client has its own FIFO queue.

*Virtual service.* Each flow ``f`` has a virtual service counter ``S_f`` in
GPU-seconds divided by its weight. Dispatching a job of estimated cost ``c`` charges
``S_f += c / w`` up front (``w`` is the weight of the job's client, asked from ``limits``
at that dispatch, so an operator's weight change applies at the flow's next dispatch;
the sessions of one address normally share a tier); when the job finishes with
measured GPU time ``g`` the charge is corrected by ``(g - c) / w_f``, so service is
counted in GPU time actually used. The system virtual time ``V`` is the largest start
tag seen (the ``S_f`` of a flow just before it was charged for a dispatched job). A flow
that becomes active after being idle (nothing queued, nothing running) starts at
``S_f = max(S_f, V)``: an idle client cannot bank credit and then monopolise the GPU.

*Dispatch.* While a capacity slot is free, pick the eligible flow with the least
``S_f`` (ties: the head admitted first) and start its next job. Within the flow the
client with the least per-client service goes first (the same rule one level down,
with the flow's own virtual time), so a flow's share is split among its sessions. A flow
is eligible while its running jobs are below ``max_running`` (per key, or per address
for anonymous clients). Dispatch is work-conserving: if any eligible job waits and a slot
is free, something starts.

With equal costs and weights this is round-robin over flows; with weights ``1:3`` the
second flow gets three times the GPU time while both are backlogged; a flow that wants
less than its share gets all it wants (max-min fairness).

*Batching.* With ``max_batch > 1`` further queued jobs with the same ``batch_key`` from
other clients join the first one, in fair order, each charged its own cost; the whole
batch occupies one slot. Only a flow's *head* job (the one the fair rule would start
next in that flow) can join, so a client's jobs always start in its own order (and from
an address's flow, only its first session in the inner order joins a given batch).

The structures (what makes each decision O(log n))
--------------------------------------------------

*Start tags.* Every queued job carries a start tag: the ``S_f`` its flow will have when
the job is that flow's next, found by replaying the flow's own queue (its clients in
their inner order) from the current ``S_f``, charging each job ``cost / w`` with the
weight last seen for its client. All tags live in one sorted list, ``_tags``, keyed
``(tag, admission seq, job id)``. A flow's head job
has tag ``S_f`` and its later jobs larger tags, so the first entry of ``_tags`` is the
job the dispatch rule picks (least ``S_f``, ties: the head admitted first), and sorting
all queued jobs by tag is the same merge over the flows that dispatch performs.

A flow's tags are recomputed (O(q log n), q = its queued jobs, at most ``max_queued``)
when its ``S_f`` moves by anything but the charge of its head job (a finish's
correction), when a job leaves from anywhere but its head (cancel), when a client's
weight is seen to change (at its submit or dispatch, or through
:meth:`FairScheduler.refresh_limits`), or when a job joins in the middle (an address
flow with several sessions). A
job appended to a one-client flow or its head dispatched costs one insert or removal.
Inside a flow the clients with queued jobs are kept in a small sorted list keyed
``(member service, head seq)``; its length is at most the flow's queued jobs.

*Eligibility.* ``max_running`` is asked from ``limits`` at dispatch, so an operator's
change applies at the next dispatch. Rather than moving flows at their ``max_running``
out of ``_tags`` and back, dispatch walks ``_tags`` from the front and skips their jobs:
a flow is skipped only while it has a job running (``max_running >= 1``), so the jobs
skipped are at most the queued jobs of the flows running (at most ``capacity *
max_batch`` flows), plus those of a flow an operator blocked with ``max_running = 0``.
The skipped flows keep their place and are eligible again the moment a job of theirs
finishes or their limit is raised, with no bookkeeping that could miss a live change.

*Batch index.* ``_by_key[k]`` is a sorted list of the head tags of the flows whose head
job has ``batch_key == k``. Filling a batch takes its first entries whose client is not
in the batch yet and whose flow is eligible, so it never looks at flows with other keys
and skips at most the clients already taken and the flows at ``max_running``. An index
was chosen over a bounded scan of the first K flows in fair order because such a scan
finds nothing when the batch's key is rare near the front, and the fill rate is
throughput. The index is built the first time ``dispatch`` is called with
``max_batch > 1`` (O(flows), once) and kept from then on, so a tier that never batches
does not pay for it.

*Positions.* A job's rank in ``_tags`` is exactly its place in the fair order over the
queued jobs if nothing else arrives, each job takes its estimate, ``max_running`` is
ignored and the weights are those last seen: the answer a full replay of the queue would
give, found by one O(log n) rank lookup. An operator's weight change moves the waiters
of that flow at its next submit or dispatch, or at once if the admin API calls
:meth:`FairScheduler.refresh_limits`. The ETA is (GPU time left in the running units + estimated cost of the
jobs ahead) / capacity. The cost ahead is summed exactly over the first
``ETA_EXACT_PLACES`` (64) places, O(64); the jobs between there and the waiter are
taken at the mean cost of the queued jobs past those places (kept as a running sum), so
farther ETAs carry the error of a mean over many jobs, a few percent with mixed costs
(an exact sum would need prefix sums over a list that re-orders).

*Housekeeping.* A flow (or a client inside a flow) that goes idle is put on a sweep
queue; each dispatch, finish and cancel looks at a few entries and forgets those whose
service is not ahead of virtual time and (flows) whose rate window counts no recent
request. Forgetting them loses nothing (they would restart at virtual time anyway). A
flow whose service is ahead (it used more than its share while others waited) is
forgotten too once it has been idle for ``idle_s`` (its rate window empty): after that
long its lead is forgiven. At most ``max_idle`` idle flows and clients are remembered:
beyond, the first on the sweep queue (about the longest idle) are forgotten, whatever
their service or rate window. Active clients (queued or running) are never forgotten,
and their usage lives in the store. So memory is bounded by what is active plus
``max_idle``, without scanning every flow; :meth:`FairScheduler.forget_idle` sweeps the
whole queue for a tier that has gone quiet.

*Cost per decision* (n = queued jobs, q = one flow's queued jobs, s = jobs of flows at
``max_running`` ahead of the first eligible one): submit O(log n) (O(q log n) for a
several-session flow or a changed weight), dispatch O((1 + s) log n) plus
O(b (b + s) log n) to fill a batch of b, finish and cancel O(q log n), position
O(log n) plus the 64-term sum of the ETA.

*Admission* (:meth:`FairScheduler.submit`) checks, in order: duplicate job id,
``requests_per_minute`` (sliding 60 s, per flow), ``max_queued`` (per flow), then
reserves the estimated GPU-seconds in the :class:`~gpu_backend.stores.usage.UsageLedger`, for the
client and, for anonymous clients, also for the address's shared ceiling
``address_gpu_seconds``. A refusal says which limit and how long until a retry can
succeed. ``limits(client)`` is asked at every admission and dispatch, so operator
changes apply at the next one.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

from splitspace.session.identity import flow_of
from splitspace.shared.contract.admin_api import AddressStanding, ClientStats
from splitspace.shared.contract.quotas import Tier

if TYPE_CHECKING:
    from splitspace.gpu_backend.stores.usage import UsageLedger

__all__ = [
    "Outcome",
    "ClientRef",
    "Admission",
    "Job",
    "FairScheduler",
    "address_usage_key",
    "RATE_WINDOW_S",
    "MIN_COST",
    "ETA_EXACT_PLACES",
]

RATE_WINDOW_S = 60.0
"""The sliding window of ``requests_per_minute``."""

MIN_COST = 1e-6
"""Costs (and weights) are clamped up to this, so every job advances its flow's virtual service."""

ETA_EXACT_PLACES = 64
"""Waiters up to this place get an ETA summed over the exact costs of the jobs ahead."""

_SWEEP_PER_CALL = 4
"""Idle flows or clients looked at by each dispatch, finish and cancel."""


def rate_reason(held: int, rpm: float | None, who: str) -> str:
    """Why a refusal, in the same words on one tier and across tiers (``global_limits``)."""
    return f"{held} requests {who}in the last {RATE_WINDOW_S:g} s (requests_per_minute={rpm})"


def queue_reason(held: int, max_queued: float, who: str) -> str:
    return f"{held} requests {who}already queued (max_queued={max_queued})"


def quota_reason(used: float, cost: float, limit: float, name: str) -> str:
    scope = "by this address " if name == "address_gpu_seconds" else ""
    if cost > limit:
        return f"this request needs {cost:.1f} GPU-seconds, more than the whole quota ({name}={limit:g})"
    return f"{used:.1f} of {limit:g} GPU-seconds used {scope}in this window ({name}={limit:g})"


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
        return flow_of(self.client_id, self.kind, self.address)

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
    seq: int = 0  # admission order; breaks ties between equal start tags


# --------------------------------------------------------------------------------------
# Internal state

_Tag = tuple[float, int, str]  # a queued job's (start tag, seq, job id)
_MemberKey = tuple[float, int, str]  # a client's (service, head seq, client id) in its flow


@dataclass(eq=False)
class _Member:
    """One client inside a flow: its FIFO queue and its service within the flow."""

    client: ClientRef
    weight: float = 1.0  # the last weight seen (its jobs' tags are computed with it)
    service: float = 0.0
    queue: deque[Job] = field(default_factory=deque)
    running: int = 0
    key: _MemberKey | None = None  # its entry in the flow's ``order``, while it has queued jobs
    swept: bool = False  # on the sweep queue
    idle_since: float = 0.0  # when it last went idle (while swept)

    @property
    def idle(self) -> bool:
        return not self.queue and self.running == 0


@dataclass(eq=False)
class _Flow:
    """One flow (an API key, or an address's anonymous clients): its service and clients."""

    flow_id: str
    service: float = 0.0  # S_f: virtual GPU-seconds (GPU-s / weight)
    inner_v: float = 0.0  # virtual time among the flow's clients
    members: dict[str, _Member] = field(default_factory=dict)
    order: list[_MemberKey] = field(default_factory=list)  # members with queued jobs, inner fair order
    queued: int = 0
    running: int = 0
    admitted_at: deque[float] = field(default_factory=deque)  # for requests_per_minute
    key: _Tag | None = None  # its head's entry in the batch index, if there is one
    key_batch: Hashable | None = None  # the head's batch key when ``key`` was made
    tail: float = 0.0  # the tag after its last queued job
    swept: bool = False  # on the sweep queue
    idle_since: float = 0.0  # when it last went idle (while swept)

    @property
    def idle(self) -> bool:
        return self.queued == 0 and self.running == 0

    def head(self) -> tuple[_Member, Job]:
        """The client the inner rule picks next, and its next job (the flow has queued jobs)."""
        member = self.members[self.order[0][2]]
        return member, member.queue[0]

    def replay(self) -> Iterator[tuple[_Member, Job]]:
        """The flow's queued jobs in the order its own rule would start them."""
        if len(self.order) == 1:
            member = self.head()[0]
            for job in member.queue:
                yield member, job
            return
        heap = []
        for service, seq, cid in self.order:
            heap.append((service, seq, cid, 0))
        heapq.heapify(heap)
        while heap:
            service, _, cid, i = heapq.heappop(heap)
            member = self.members[cid]
            job = member.queue[i]
            yield member, job
            if i + 1 < len(member.queue):
                nxt = member.queue[i + 1]
                heapq.heappush(heap, (service + job.cost / member.weight, nxt.seq, cid, i + 1))


@dataclass
class _Running:
    job: Job
    weight: float
    unit: int
    charged: float = 0.0
    """GPU-seconds counted in its flow's service so far: its cost at dispatch, more as it accrues."""


class FairScheduler:
    """Weighted fair queueing of GPU jobs over clients; see the module docstring."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        limits: Callable[[ClientRef], Tier],
        store: UsageLedger,
        capacity: int = 1,
        held: Callable[[str], bool] | None = None,
        service_floor: Callable[[str, float], float] | None = None,
        idle_s: float = 600.0,
        max_idle: int = 10000,
    ) -> None:
        """``held(flow_id)``: a flow to skip at dispatch for now (its running slot is taken
        on another replica); ``service_floor(flow_id, V)``: where a flow that becomes
        active starts instead of ``V`` (its service on other replicas). Both are read
        under the runner's lock and must not do I/O (gpu_backend/stores/global_limits.py).
        ``idle_s``, ``max_idle``: how long, and how many, idle flows and clients are
        remembered (see *Housekeeping*)."""
        if max_idle < 1 or not idle_s > 0:
            raise ValueError(f"max_idle and idle_s must be positive, got {max_idle!r}, {idle_s!r}")
        self.idle_s = float(idle_s)
        self.max_idle = int(max_idle)
        self._held = held
        self._service_floor = service_floor
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
        self._seen: OrderedDict[str, ClientRef] = OrderedDict()  # clients seen, the least recent first
        self._tags: SortedList = SortedList()  # the _Tag of each queued job
        self._tag_of: dict[str, _Tag] = {}
        self._by_key: dict[Hashable, SortedList] | None = None  # batch key -> head _Tags; built on first use
        self._queued_cost = 0.0  # sum of queued jobs' estimates
        self._depth: dict[str, list[int]] = {}  # tier -> [queued, running]
        self._sweep: deque[tuple[_Flow, _Member | None]] = deque()

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
        self._seen.move_to_end(client.client_id)
        self._trim_seen(_SWEEP_PER_CALL)
        flow = self._flows.get(client.flow_id) or _Flow(client.flow_id)

        refused = self._check_rate(flow, tier, now) or self._check_queue(flow, tier)
        if refused is not None:
            return refused
        job = Job(
            job_id=job_id, client=client, cost=cost, batch_key=batch_key, submitted_at=now, seq=next(self._job_seq)
        )
        refused = self._reserve(job, tier, now)
        if refused is not None:
            return refused

        if flow.idle:
            flow.service = max(flow.service, self._vtime)
            if self._service_floor is not None:
                flow.service = max(flow.service, self._service_floor(flow.flow_id, self._vtime))
        self._flows[flow.flow_id] = flow
        weight = max(tier.weight, MIN_COST)
        member = flow.members.get(client.client_id)
        if member is None:
            member = flow.members[client.client_id] = _Member(client, weight)
        if member.idle:
            member.service = max(member.service, flow.inner_v)
        member.client = client
        # Appended to the flow's only queued client, with the weight its tags have: the
        # new job goes last in the flow's order, so only its own tag is new.
        appended = weight == member.weight and (not flow.order or flow.order == [member.key])
        start = flow.service if flow.queued == 0 else flow.tail

        if member.queue:  # behind the client's own jobs: no head changes
            member.queue.append(job)
        else:  # the client joins its flow's inner order, perhaps at the front
            self._unlist(flow)
            member.queue.append(job)
            self._order(flow, member)
        flow.queued += 1
        flow.admitted_at.append(now)
        member.weight = weight
        self._queued[job_id] = job
        self._queued_cost += cost
        self._count(job, queued=1)
        if appended:
            self._tag(job, start)
            flow.tail = start + cost / weight
        else:
            self._retag(flow)
        if flow.key is None:
            self._list(flow)
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
        return Admission(Outcome.RATE_LIMITED, max(0.0, retry), rate_reason(len(times), rpm, who))

    def _check_queue(self, flow: _Flow, tier: Tier) -> Admission | None:
        if flow.queued < tier.max_queued:
            return None
        retry = 0.0
        if flow.queued:
            first = flow.head()[1]  # the flow's first job in the fair order
            place = self.position(first.job_id)
            retry = max(place[1] if place else 0.0, first.cost)
        who = "from this address " if flow.flow_id.startswith("addr:") else ""
        return Admission(Outcome.QUEUE_FULL, retry, queue_reason(flow.queued, tier.max_queued, who))

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
        reason = quota_reason(self._store.usage(key, now)[0], cost, limit, name)
        return Admission(Outcome.QUOTA_EXCEEDED, max(0.0, retry), reason)

    # -- dispatch --------------------------------------------------------------------

    def dispatch(self, max_batch: int | Callable[[Job], int] = 1) -> list[Job]:
        """Start the next dispatch unit: one job, or a batch sharing one slot.

        ``max_batch``: the most jobs one unit holds, or a function of its head job that says
        it (kinds of work batch differently: the batch key of a job says which it joins).
        Returns the started jobs (empty when no slot is free or nothing eligible waits);
        call again while it returns jobs.
        """
        if self.free_slots <= 0 or not self._queued:
            return []
        limits = _Memo(self._limits)
        head = self._pick(limits)
        if head is None:
            return []
        unit = next(self._unit_ids)
        batch = [self._start(*head, limits, unit)]
        batch_key = batch[0].batch_key
        if callable(max_batch):
            max_batch = max_batch(batch[0])
        if max_batch > 1 and batch_key is not None:
            if self._by_key is None:
                self._index_batches()
            taken = {batch[0].client.client_id}
            while len(batch) < max_batch:
                pick = self._pick_batch(limits, batch_key, taken)
                if pick is None:
                    break
                batch.append(self._start(*pick, limits, unit))
                taken.add(batch[-1].client.client_id)
        self._units[unit] = {job.job_id for job in batch}
        self._collect_idle()
        return batch

    def extend(self, batch: list[Job], max_batch: int) -> list[Job]:
        """Add queued jobs compatible with a running batch (same ``batch_key``, other
        clients, in fair order) until it holds ``max_batch``; the added jobs. For a
        batching window: the GPU thread, holding a small batch, takes what arrived."""
        if not batch or len(batch) >= max_batch or batch[0].batch_key is None:
            return []
        first = self._running.get(batch[0].job_id)
        if first is None:
            return []
        if self._by_key is None:
            self._index_batches()
        limits = _Memo(self._limits)
        taken = {job.client.client_id for job in batch}
        added: list[Job] = []
        while len(batch) + len(added) < max_batch:
            pick = self._pick_batch(limits, batch[0].batch_key, taken)
            if pick is None:
                break
            added.append(self._start(*pick, limits, first.unit))
            taken.add(added[-1].client.client_id)
        self._units[first.unit] |= {job.job_id for job in added}
        self._collect_idle()
        return added

    def _pick(self, limits: _Memo) -> tuple[_Flow, _Member] | None:
        """The first eligible flow in fair order, and its first eligible client.

        The first tag of a flow met in ``_tags`` is its head. The jobs skipped belong to
        flows at their ``max_running``: each has a job running (or ``max_running == 0``),
        so few are skipped however many flows wait.
        """
        skipped: set[str] = set()
        for _, _, job_id in self._tags:
            flow_id = self._queued[job_id].client.flow_id
            if flow_id in skipped:
                continue
            flow = self._flows[flow_id]
            if self._held is not None and self._held(flow_id):
                skipped.add(flow_id)
                continue
            for _, _, cid in flow.order:
                member = flow.members[cid]
                if flow.running < limits(member.client).max_running:
                    return flow, member
            skipped.add(flow_id)
        return None

    def _pick_batch(self, limits: _Memo, batch_key: Hashable, taken: set[str]) -> tuple[_Flow, _Member] | None:
        """The first eligible flow in fair order whose head job has ``batch_key`` and whose
        head client is not in the batch yet."""
        assert self._by_key is not None
        for _, _, job_id in self._by_key.get(batch_key, ()):
            flow = self._flows[self._queued[job_id].client.flow_id]
            member, _ = flow.head()
            if self._held is not None and self._held(flow.flow_id):
                continue
            if member.client.client_id not in taken and flow.running < limits(member.client).max_running:
                return flow, member
        return None

    def _start(self, flow: _Flow, member: _Member, limits: _Memo, unit: int) -> Job:
        job = member.queue[0]
        weight = max(limits(member.client).weight, MIN_COST)
        # The head of the flow leaves at the charge its tags assumed: the rest keep theirs.
        keeps_tags = weight == member.weight and flow.order[0] == member.key
        self._unlist(flow)
        self._unorder(flow, member)
        self._untag(job)
        self._vtime = max(self._vtime, flow.service)
        flow.inner_v = max(flow.inner_v, member.service)
        flow.service += job.cost / weight
        member.service += job.cost / weight
        member.weight = weight
        member.queue.popleft()
        flow.queued -= 1
        flow.running += 1
        member.running += 1
        del self._queued[job.job_id]
        self._queued_cost -= job.cost
        self._count(job, queued=-1, running=1)
        self._order(flow, member)
        if not keeps_tags:
            self._retag(flow)
        self._list(flow)
        job.started_at = self._clock()
        self._running[job.job_id] = _Running(job, weight, unit, job.cost)
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
        correction = (gpu_s - entry.charged) / entry.weight
        if correction:
            self._unlist(flow)
            self._unorder(flow, member)
            flow.service += correction
            member.service += correction
            self._order(flow, member)
            self._retag(flow)
            self._list(flow)
        flow.running -= 1
        member.running -= 1
        self._count(job, running=-1)
        self._settle(job, gpu_s, now)
        unit = self._units[entry.unit]
        unit.discard(job_id)
        if not unit:
            del self._units[entry.unit]
        self._went_idle(flow, member)
        self._collect_idle()

    def accrue(self, job_id: str, used_s: float) -> bool:
        """Charge a running job the GPU time it has used so far, while it still runs (a long
        stream): its flow's service and its usage grow now rather than at its finish, so a
        flow whose stream outruns its estimate is behind the others at the next dispatch
        (with several slots, while the stream still runs) and its standing shows what it
        used. Only time beyond what is already charged counts; :meth:`finish` settles the
        rest (a measured time below the charge gives the difference back). False if the job
        is not running."""
        entry = self._running.get(job_id)
        if entry is None:
            return False
        job, used = entry.job, max(0.0, float(used_s))
        if used > entry.charged:
            flow = self._flows[job.client.flow_id]
            member = flow.members[job.client.client_id]
            self._unlist(flow)
            self._unorder(flow, member)
            flow.service += (used - entry.charged) / entry.weight
            member.service += (used - entry.charged) / entry.weight
            entry.charged = used
            self._order(flow, member)
            self._retag(flow)
            self._list(flow)
        if used > job.reserved:
            self._settle(job, used, self._clock())
        return True

    def requeue(self, job_id: str) -> bool:
        """Undo a dispatch: put a running job back at the head of its client's queue, with
        its charge taken back (its running slot was refused elsewhere, so it did not run).
        False if the job is not running."""
        entry = self._running.pop(job_id, None)
        if entry is None:
            return False
        job = entry.job
        flow = self._flows[job.client.flow_id]
        member = flow.members[job.client.client_id]
        self._unlist(flow)
        self._unorder(flow, member)
        flow.service -= entry.charged / entry.weight
        member.service -= entry.charged / entry.weight
        flow.running -= 1
        member.running -= 1
        member.queue.appendleft(job)
        flow.queued += 1
        job.started_at = None
        self._queued[job_id] = job
        self._queued_cost += job.cost
        self._count(job, queued=1, running=-1)
        self._order(flow, member)
        self._retag(flow)
        self._list(flow)
        unit = self._units[entry.unit]
        unit.discard(job_id)
        if not unit:
            del self._units[entry.unit]
        return True

    def cancel(self, job_id: str) -> bool:
        """Remove a queued job and release its reservation; False if running or unknown."""
        job = self._queued.pop(job_id, None)
        if job is None:
            return False
        flow = self._flows[job.client.flow_id]
        member = flow.members[job.client.client_id]
        at_head = member.queue[0] is job  # else the client's key and the flow's head stay
        if at_head:
            self._unlist(flow)
            self._unorder(flow, member)
        self._untag(job)
        member.queue.remove(job)
        flow.queued -= 1
        self._queued_cost -= job.cost
        self._count(job, queued=-1)
        if at_head:
            self._order(flow, member)
        self._retag(flow)  # the jobs behind it move up
        if at_head:
            self._list(flow)
        self._settle(job, 0.0, self._clock())
        self._went_idle(flow, member)
        self._collect_idle()
        return True

    def _settle(self, job: Job, gpu_s: float, now: float) -> None:
        delta = gpu_s - job.reserved
        if delta:
            self._store.adjust(job.client.client_id, delta, now)
            if job.reserved_address:
                self._store.adjust(address_usage_key(job.client.address), delta, now)
        job.reserved = gpu_s

    # -- the ordered structures ------------------------------------------------------

    def _list(self, flow: _Flow) -> None:
        """Enter the flow's head in the batch index (once there is one), after its tags."""
        if self._by_key is None or not flow.order:
            return
        _, job = flow.head()
        if job.batch_key is None:
            return
        key = flow.key = self._tag_of[job.job_id]
        flow.key_batch = job.batch_key
        index = self._by_key.get(job.batch_key)
        if index is None:
            index = self._by_key[job.batch_key] = SortedList()
        index.add(key)

    def _unlist(self, flow: _Flow) -> None:
        """Take the flow's head out of the batch index before the head or its tag changes."""
        if flow.key is None:
            return
        assert self._by_key is not None
        index = self._by_key[flow.key_batch]
        index.remove(flow.key)
        if not index:
            del self._by_key[flow.key_batch]
        flow.key = None

    def _index_batches(self) -> None:
        """Build the batch index (the first time a dispatch may batch)."""
        self._by_key = {}
        for flow in self._flows.values():
            self._list(flow)

    @staticmethod
    def _order(flow: _Flow, member: _Member) -> None:
        """Enter the client in its flow's inner order if it has queued jobs."""
        if not member.queue:
            return
        head = member.queue[0]
        member.key = (member.service, head.seq, member.client.client_id)
        bisect.insort(flow.order, member.key)

    @staticmethod
    def _unorder(flow: _Flow, member: _Member) -> None:
        if member.key is None:
            return
        i = bisect.bisect_left(flow.order, member.key)
        del flow.order[i]
        member.key = None

    def _tag(self, job: Job, tag: float) -> None:
        key = self._tag_of[job.job_id] = (tag, job.seq, job.job_id)
        self._tags.add(key)

    def _untag(self, job: Job) -> None:
        self._tags.remove(self._tag_of.pop(job.job_id))

    def _retag(self, flow: _Flow) -> None:
        """Recompute the start tags of the flow's queued jobs from its current state."""
        if not flow.queued:
            return
        tag = flow.service
        for member, job in flow.replay():
            old = self._tag_of.get(job.job_id)
            if old is None or old[0] != tag:
                if old is not None:
                    self._tags.remove(old)
                self._tag(job, tag)
            tag += job.cost / member.weight
        flow.tail = tag

    def _count(self, job: Job, queued: int = 0, running: int = 0) -> None:
        depth = self._depth.setdefault(job.client.tier, [0, 0])
        depth[0] += queued
        depth[1] += running
        if depth == [0, 0]:
            del self._depth[job.client.tier]
        if not self._queued:
            self._queued_cost = 0.0  # no drift left behind by the running sum

    # -- housekeeping ----------------------------------------------------------------

    def _went_idle(self, flow: _Flow, member: _Member) -> None:
        now = self._clock()
        if member.idle:
            member.idle_since = now  # also when its entry from an earlier idle spell is still queued
            if not member.swept:
                member.swept = True
                self._sweep.append((flow, member))
        if flow.idle:
            flow.idle_since = now
            if not flow.swept:
                flow.swept = True
                self._sweep.append((flow, None))

    def _collect_idle(self, looks: int = _SWEEP_PER_CALL) -> None:
        """Look at ``looks`` entries of the sweep queue: forget the idle flows and clients
        whose service is behind virtual time (no state lost: they would restart there
        anyway) or which have been idle for ``idle_s``, unless the flow's rate window
        still counts requests; the others go back on the queue. Beyond ``max_idle``
        entries, the first ones are forgotten whatever their service."""
        now = self._clock()
        while len(self._sweep) > self.max_idle:
            flow, member = self._sweep.popleft()
            self._forget(flow, member, now, force=True)
        for _ in range(min(looks, len(self._sweep))):
            flow, member = self._sweep.popleft()
            if not self._forget(flow, member, now, force=False):
                self._sweep.append((flow, member))
        self._trim_seen(looks)

    def _trim_seen(self, looks: int) -> None:
        """Past ``max_idle`` clients seen, forget the least recent ones that are not
        remembered in a flow (those seen only to be refused, or whose usage window is
        live): ``looks`` at most."""
        for _ in range(min(looks, len(self._seen) - self.max_idle)):
            cid, ref = next(iter(self._seen.items()))
            flow = self._flows.get(ref.flow_id)
            if flow is not None and cid in flow.members:
                self._seen.move_to_end(cid)  # it goes with its member
            else:
                del self._seen[cid]

    def _forget(self, flow: _Flow, member: _Member | None, now: float, *, force: bool) -> bool:
        """Forget one sweep entry if it may go (always if ``force``); False to keep it."""
        if self._flows.get(flow.flow_id) is not flow:
            return True  # forgotten already
        if member is None:
            if not flow.idle:
                flow.swept = False
                return True
            recent = flow.admitted_at and flow.admitted_at[-1] > now - RATE_WINDOW_S
            long_idle = now - flow.idle_since >= self.idle_s
            if force or (not recent and (flow.service <= self._vtime or long_idle)):
                del self._flows[flow.flow_id]
                for cid in flow.members:
                    self._unsee(cid, now)
                return True
            return False
        if flow.members.get(member.client.client_id) is not member:
            return True
        if not member.idle:
            member.swept = False
            return True
        if force or member.service <= flow.inner_v or now - member.idle_since >= self.idle_s:
            del flow.members[member.client.client_id]
            self._unsee(member.client.client_id, now)
            return True
        return False

    def _unsee(self, client_id: str, now: float) -> None:
        """A forgotten client stays in :meth:`clients` only while its usage window is live."""
        if client_id in self._seen and self._store.usage(client_id, now)[0] <= 0:
            del self._seen[client_id]

    def forget_idle(self) -> int:
        """Look at every idle flow and client once (a quiet tier calls this now and then:
        the sweep otherwise runs with dispatch, finish and cancel). How many flows and
        clients are remembered after it."""
        self._collect_idle(len(self._sweep))
        now = self._clock()
        for cid, ref in list(self._seen.items()):
            flow = self._flows.get(ref.flow_id)
            if flow is None or cid not in flow.members:
                self._unsee(cid, now)
        return len(self._flows) + sum(len(f.members) for f in self._flows.values())

    # -- positions -------------------------------------------------------------------

    def position(self, job_id: str) -> tuple[int, float] | None:
        """``(1-based place in dispatch order, ETA seconds until start)``; None if not queued."""
        key = self._tag_of.get(job_id)
        if key is None:
            return None
        ahead = self._tags.index(key)
        running_left = 0.0
        now = self._clock()
        for members in self._units.values():
            jobs = [self._running[j].job for j in members]
            started = min(now if j.started_at is None else j.started_at for j in jobs)
            running_left += max(0.0, started + max(j.cost for j in jobs) - now)
        exact = min(ahead, ETA_EXACT_PLACES)
        first = sum(self._queued[k[2]].cost for k in self._tags.islice(0, exact))
        ahead_cost = first
        if ahead > exact:
            rest = len(self._tags) - exact
            ahead_cost += (ahead - exact) * max(0.0, self._queued_cost - first) / rest
        return ahead + 1, (running_left + ahead_cost) / self._capacity

    # -- reporting -------------------------------------------------------------------

    def limits_for(self, client: ClientRef) -> Tier:
        """The limits in force for ``client`` now (tier, file and operator overrides)."""
        return self._limits(client)

    def refresh_limits(self, client_id: str | None = None) -> None:
        """Re-read the weight of one client (or of every client with queued jobs) and
        re-tag its flow if it changed, so that positions follow an operator's change at
        once. Dispatch applies a new weight at the flow's next job without this; until
        then, or this call, positions use the weight last seen. O(q log n) for one
        client; for all (after a quota-file reload) O(n) calls to ``limits``."""
        if client_id is None:
            flows = [f for f in self._flows.values() if f.queued]
        else:
            ref = self._seen.get(client_id)
            flow = self._flows.get(ref.flow_id) if ref is not None else None
            flows = [flow] if flow is not None and flow.queued else []
        for flow in flows:
            changed = False
            for member in flow.members.values():
                if member.queue and (client_id is None or member.client.client_id == client_id):
                    weight = max(self._limits(member.client).weight, MIN_COST)
                    changed |= weight != member.weight
                    member.weight = weight
            if changed:
                self._retag(flow)

    def client_stats(self, client: ClientRef | str) -> ClientStats:
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
        stats: ClientStats = {
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
            stats["address"] = AddressStanding(used=a_used, remaining=a_remaining, resets_in_s=a_resets)
            if a_remaining < remaining:
                stats["remaining"], stats["resets_in_s"] = a_remaining, a_resets
        return stats

    def clients(self) -> list[ClientStats]:
        """Stats of every client queued, running, or with usage in its live window."""
        out: list[ClientStats] = []
        now = self._clock()
        for cid, ref in list(self._seen.items()):
            flow = self._flows.get(ref.flow_id)
            member = flow.members.get(cid) if flow else None
            active = member is not None and not member.idle
            if not active and self._store.usage(cid, now)[0] <= 0:
                del self._seen[cid]  # nothing to report; forget it
                continue
            out.append(self.client_stats(ref))
        return out

    def depth_by_tier(self) -> dict[str, tuple[int, int]]:
        """``tier -> (queued, running)`` jobs."""
        return {tier: (q, r) for tier, (q, r) in self._depth.items()}

    # -- checks ----------------------------------------------------------------------

    def _check_invariants(self) -> None:
        """Assert that the ordered structures agree with the queues (for tests; O(n log n))."""
        assert sum(f.queued for f in self._flows.values()) == len(self._queued) == len(self._tags)
        assert set(self._tag_of) == set(self._queued) and set(self._tag_of.values()) == set(self._tags)
        heads: set[_Tag] = set()
        for flow in self._flows.values():
            members = [m for m in flow.members.values() if m.queue]
            assert flow.queued == sum(len(m.queue) for m in members)
            assert flow.running == sum(m.running for m in flow.members.values())
            assert sorted(m.key for m in members) == flow.order  # type: ignore[type-var]
            for m in members:
                assert m.key == (m.service, m.queue[0].seq, m.client.client_id)
            if not flow.queued:
                assert flow.key is None and not flow.order
                continue
            tag = flow.service  # the head's tag is S_f, the others follow the flow's replay
            for member, job in flow.replay():
                assert self._tag_of[job.job_id] == (tag, job.seq, job.job_id), job.job_id
                tag += job.cost / member.weight
            assert abs(flow.tail - tag) <= 1e-9 * max(1.0, abs(tag))
            _, head = flow.head()
            if self._by_key is not None and head.batch_key is not None:
                assert flow.key == self._tag_of[head.job_id] and flow.key_batch == head.batch_key
                heads.add(flow.key)
            else:
                assert flow.key is None
        if self._by_key is not None:
            assert {k for index in self._by_key.values() for k in index} == heads
            assert sum(len(index) for index in self._by_key.values()) == len(heads)
        depth: dict[str, list[int]] = {}
        for job in self._queued.values():
            depth.setdefault(job.client.tier, [0, 0])[0] += 1
        for entry in self._running.values():
            depth.setdefault(entry.job.client.tier, [0, 0])[1] += 1
        assert depth == self._depth
        assert abs(self._queued_cost - sum(j.cost for j in self._queued.values())) <= 1e-6 * max(1, len(self._queued))


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
