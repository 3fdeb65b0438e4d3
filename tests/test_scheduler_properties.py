"""Properties of FairScheduler under random arrivals, costs, cancellations and limits.

An event-driven run in virtual time, with its own bookkeeping (independent of the
scheduler's) to check: no job lost, none dispatched twice or after cancel, every job
ends refused (with a reason), cancelled or finished; running never exceeds capacity or a
flow's max_running; a free slot never stays idle while eligible work waits; usage equals
the GPU time of finished jobs (cancelled reservations released); and after every event
the scheduler's ordered structures (start tags, batch index, per-flow order, counts)
agree with its queues.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from splitspace.gpu_backend.admission.scheduler import ClientRef, FairScheduler, Job, Outcome, address_usage_key
from splitspace.gpu_backend.stores.usage import MemoryUsageStore
from splitspace.shared.contract.quotas import Tier


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Arrival:
    after: float  # seconds after the previous arrival
    client: int
    cost: float
    actual_factor: float  # measured GPU time = cost * factor
    batch_key: str | None
    cancel_after: float | None  # try to cancel this long after submitting


CLIENTS = [
    ClientRef("key:a", "key", "free", "10.0.0.9"),
    ClientRef("key:b", "key", "pro", "10.0.0.9"),
    ClientRef("session:s1", "session", "anonymous", "10.0.0.1"),
    ClientRef("session:s2", "session", "anonymous", "10.0.0.1"),
    ClientRef("addr:10.0.0.1", "address", "anonymous", "10.0.0.1"),
    ClientRef("session:s3", "session", "anonymous", "10.0.0.2"),
]

tiers = st.builds(
    Tier,
    weight=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    max_running=st.integers(1, 3),
    max_queued=st.integers(0, 6),
    gpu_seconds=st.sampled_from([1.0, 5.0, 20.0, math.inf]),
    window_s=st.just(1e9),  # one window for the whole run, so usage can be checked exactly
    address_gpu_seconds=st.sampled_from([None, 3.0, 30.0]),
    requests_per_minute=st.sampled_from([None, 1, 3, 10]),
)

arrivals = st.builds(
    Arrival,
    after=st.sampled_from([0.0, 0.0, 0.05, 0.3, 1.0, 7.0]),
    client=st.integers(0, len(CLIENTS) - 1),
    cost=st.floats(0.0, 3.0),
    actual_factor=st.sampled_from([0.1, 0.5, 1.0, 1.0, 2.0]),
    batch_key=st.sampled_from([None, None, "x", "y"]),
    cancel_after=st.one_of(st.none(), st.sampled_from([0.0, 0.1, 1.0, 5.0])),
)


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(1, 3),
    max_batch=st.integers(1, 3),
    tier_by_client=st.lists(tiers, min_size=len(CLIENTS), max_size=len(CLIENTS)),
    plan=st.lists(arrivals, max_size=40),
)
def test_every_job_is_accounted_for(
    capacity: int, max_batch: int, tier_by_client: list[Tier], plan: list[Arrival]
) -> None:
    limits = {ref: tier for ref, tier in zip(CLIENTS, tier_by_client, strict=True)}
    clock, store = FakeClock(), MemoryUsageStore()
    sched = FairScheduler(clock=clock, limits=limits.__getitem__, store=store, capacity=capacity)

    state: dict[str, str] = {}  # job id -> queued | running | finished | cancelled | refused
    jobs: dict[str, tuple[ClientRef, Arrival]] = {}
    flow_running: Counter[str] = Counter()
    units_running = 0
    gpu_used: Counter[str] = Counter()
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()
    t = 0.0
    for n, arrival in enumerate(plan):
        t += arrival.after
        heapq.heappush(events, (t, next(seq), "submit", n))

    def dispatch_all() -> None:
        nonlocal units_running
        while batch := sched.dispatch(max_batch):
            units_running += 1
            assert units_running <= capacity
            assert 1 <= len(batch) <= max_batch
            assert len({job.client.client_id for job in batch}) == len(batch)
            if len(batch) > 1:
                assert batch[0].batch_key is not None
                assert all(job.batch_key == batch[0].batch_key for job in batch)
            for job in batch:
                assert state.get(job.job_id) == "queued", (job.job_id, state.get(job.job_id))
                state[job.job_id] = "running"
                flow_running[job.client.flow_id] += 1
                assert flow_running[job.client.flow_id] <= limits[job.client].max_running
            end = clock.now + max(job.cost * jobs[job.job_id][1].actual_factor for job in batch)
            heapq.heappush(events, (end, next(seq), "finish", batch))
        # Work conserving: a free slot means no queued job is eligible.
        if sched.free_slots > 0:
            for job_id, s in state.items():
                if s == "queued":
                    ref = jobs[job_id][0]
                    assert flow_running[ref.flow_id] >= limits[ref].max_running, job_id
        assert sched.running_count == sum(1 for s in state.values() if s == "running")
        assert len(sched) == sum(1 for s in state.values() if s == "queued")
        sched._check_invariants()  # the ordered structures agree with the queues

    while events:
        clock.now, _, kind, payload = heapq.heappop(events)
        if kind == "submit":
            assert isinstance(payload, int)
            arrival = plan[payload]
            job_id, ref = f"j{payload}", CLIENTS[arrival.client]
            jobs[job_id] = (ref, arrival)
            admission = sched.submit(job_id, ref, arrival.cost, arrival.batch_key)
            if admission.ok:
                state[job_id] = "queued"
                place = sched.position(job_id)
                assert place is not None and 1 <= place[0] <= len(sched) and place[1] >= 0
                if arrival.cancel_after is not None:
                    heapq.heappush(events, (clock.now + arrival.cancel_after, next(seq), "cancel", job_id))
            else:
                assert admission.outcome in (Outcome.QUEUE_FULL, Outcome.RATE_LIMITED, Outcome.QUOTA_EXCEEDED)
                assert admission.reason and admission.retry_after_s >= 0
                state[job_id] = "refused"
        elif kind == "cancel":
            assert isinstance(payload, str)
            was_queued = state[payload] == "queued"
            assert sched.cancel(payload) is was_queued
            if was_queued:
                state[payload] = "cancelled"
            assert sched.position(payload) is None
        else:
            assert isinstance(payload, list)
            for job in payload:
                assert isinstance(job, Job)
                gpu_s = job.cost * jobs[job.job_id][1].actual_factor
                sched.finish(job.job_id, gpu_s)
                state[job.job_id] = "finished"
                flow_running[job.client.flow_id] -= 1
                gpu_used[job.client.client_id] += gpu_s
                if job.client.is_anonymous and limits[job.client].address_gpu_seconds is not None:
                    gpu_used[address_usage_key(job.client.address)] += gpu_s
            units_running -= 1
        dispatch_all()

    assert set(state) == {f"j{n}" for n in range(len(plan))}
    assert set(state.values()) <= {"refused", "cancelled", "finished"}
    assert len(sched) == 0 and sched.running_count == 0 and sched.free_slots == capacity
    assert sched.depth_by_tier() == {}
    for key in {ref.client_id for ref in CLIENTS} | {address_usage_key(r.address) for r in CLIENTS}:
        assert abs(store.usage(key, clock.now)[0] - gpu_used[key]) < 1e-6, key
