"""FairScheduler in virtual time, in the manner of Kubernetes' queueset_test.go.

Scenarios are data (clients, weights, costs, arrival patterns); a tiny simulator runs
them on a fake clock with one executor and measures each client's share of GPU time,
which must be within 2% of the independent max-min fair oracle. Nothing sleeps.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import pytest

from gpu_backend.scheduler import (
    Admission,
    ClientRef,
    FairScheduler,
    Job,
    Outcome,
    address_usage_key,
)
from gpu_backend.usage import MemoryUsageStore
from shared.quotas import Tier
from tests.fairness_oracle import weighted_max_min

INF = math.inf
TOLERANCE = 0.02

# Limits that never refuse, so that fairness scenarios measure the order alone.
OPEN = Tier(weight=1, max_running=1, max_queued=1000, gpu_seconds=INF, window_s=3600)


class FakeClock:
    """The scheduler's only notion of time; tests move it by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def key(name: str, tier: str = "free") -> ClientRef:
    return ClientRef(client_id=f"key:{name}", kind="key", tier=tier, address="10.9.9.9")


def session(sid: str, address: str = "10.0.0.1") -> ClientRef:
    return ClientRef(client_id=f"session:{sid}", kind="session", tier="anonymous", address=address)


# --------------------------------------------------------------------------------------
# The simulator


@dataclass(frozen=True)
class Load:
    """One synthetic client: who it is and when it sends jobs."""

    name: str
    weight: float = 1.0
    cost: float = 1.0  # estimated GPU-seconds per job
    actual: float | None = None  # measured GPU-seconds per job (default: cost)
    backlog: int = 0  # keep this many jobs queued at all times
    every: float | None = None  # one job every `every` seconds from `start`
    burst: int = 0  # jobs sent at once at `start`
    start: float = 0.0
    kind: str = "key"  # "key" | "session"
    address: str = "10.0.0.1"
    fresh_ids: bool = False  # a new session id for every job (a cookie-minting client)
    tier: Tier = OPEN


class Sim:
    """Drives a FairScheduler with one executor (or ``capacity``) in virtual time."""

    def __init__(self, loads: list[Load], *, capacity: int = 1) -> None:
        self.loads = {load.name: load for load in loads}
        self.tiers = {load.name: replace(load.tier, weight=load.weight) for load in loads}
        self.clock = FakeClock()
        self.store = MemoryUsageStore()
        self.sched = FairScheduler(clock=self.clock, limits=self._limits, store=self.store, capacity=capacity)
        self.owner: dict[str, str] = {}  # client id -> load name
        self.queued: Counter[str] = Counter()  # load name -> jobs queued
        self.served: Counter[str] = Counter()  # load name -> GPU-seconds done
        self.started: dict[str, float] = {}
        self.submitted: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.refusals: list[Admission] = []
        self._running: list[tuple[float, int, list[Job]]] = []  # heap of (end, seq, batch)
        self._arrivals: list[tuple[float, int, str]] = []  # heap of (time, seq, load)
        self._seq = itertools.count()
        self._ids = itertools.count()
        for load in loads:
            times = [load.start] * load.burst
            if load.every is not None or load.backlog:
                times.append(load.start)
            for t in times:
                heapq.heappush(self._arrivals, (t, next(self._seq), load.name))

    def _limits(self, client: ClientRef) -> Tier:
        return self.tiers[self.owner[client.client_id]]

    def _client(self, load: Load) -> ClientRef:
        n = next(self._ids)
        if load.kind == "key":
            ref = ClientRef(f"key:{load.name}", "key", "t", load.address)
        else:
            sid = f"{load.name}-{n}" if load.fresh_ids else load.name
            ref = ClientRef(f"session:{sid}", "session", "anonymous", load.address)
        self.owner[ref.client_id] = load.name
        return ref

    def _submit(self, load: Load) -> bool:
        job_id = f"{load.name}#{next(self._ids)}"
        admission = self.sched.submit(job_id, self._client(load), load.cost)
        if not admission.ok:
            self.refusals.append(admission)
            return False
        self.queued[load.name] += 1
        self.submitted[job_id] = self.clock.now
        return True

    def _top_up(self) -> None:
        for load in self.loads.values():
            if load.backlog and self.clock.now >= load.start:
                while self.queued[load.name] < load.backlog and self._submit(load):
                    pass

    def _dispatch(self, max_batch: int = 1) -> None:
        while True:
            self._top_up()
            batch = self.sched.dispatch(max_batch)
            if not batch:
                return
            for job in batch:
                name = self.owner[job.client.client_id]
                self.queued[name] -= 1
                self.started[job.job_id] = self.clock.now
            duration = max(self._actual(job) for job in batch)
            heapq.heappush(self._running, (self.clock.now + duration, next(self._seq), batch))

    def _actual(self, job: Job) -> float:
        load = self.loads[self.owner[job.client.client_id]]
        return load.cost if load.actual is None else load.actual

    def run(self, until: float) -> None:
        """Run events up to ``until``: completions first, then arrivals, then dispatch."""
        while True:
            nxt = min(
                self._running[0][0] if self._running else INF,
                self._arrivals[0][0] if self._arrivals else INF,
            )
            if nxt > until:
                break
            self.clock.now = max(self.clock.now, nxt)
            while self._running and self._running[0][0] <= self.clock.now:
                _, _, batch = heapq.heappop(self._running)
                for job in batch:
                    gpu_s = self._actual(job)
                    self.sched.finish(job.job_id, gpu_s)
                    self.served[self.owner[job.client.client_id]] += gpu_s
                    self.ended[job.job_id] = self.clock.now
            while self._arrivals and self._arrivals[0][0] <= self.clock.now:
                _, _, name = heapq.heappop(self._arrivals)
                load = self.loads[name]
                if not load.backlog:
                    self._submit(load)
                if load.every is not None:
                    heapq.heappush(self._arrivals, (self.clock.now + load.every, next(self._seq), name))
            self._dispatch()
        self.clock.now = until

    def served_until_now(self) -> Counter[str]:
        """GPU-seconds per load, counting jobs in progress up to now."""
        served = Counter(self.served)
        for _, _, batch in self._running:
            for job in batch:
                name = self.owner[job.client.client_id]
                served[name] += min(self.clock.now - self.started[job.job_id], self._actual(job))
        return served


def demand(load: Load) -> float:
    """GPU-seconds per second the load asks for."""
    if load.backlog:
        return INF
    if load.every is not None:
        return (load.cost if load.actual is None else load.actual) / load.every
    return 0.0


def assert_fair_shares(sim: Sim, since: Counter[str], seconds: float, group: dict[str, str] | None = None) -> None:
    """Each group's GPU share over the last ``seconds`` is within TOLERANCE of the oracle."""
    group = group or {name: name for name in sim.loads}
    demands: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = {}
    for name, load in sim.loads.items():
        demands[group[name]] += demand(load)
        weights[group[name]] = sim.tiers[name].weight
    fair = weighted_max_min(dict(demands), weights, float(sim.sched.capacity))
    served = sim.served_until_now()
    measured: dict[str, float] = defaultdict(float)
    for name in sim.loads:
        measured[group[name]] += (served[name] - since[name]) / seconds
    for g in fair:
        assert measured[g] == pytest.approx(fair[g], abs=TOLERANCE), (g, dict(measured), fair)


# --------------------------------------------------------------------------------------
# Fair shares


@pytest.mark.parametrize(
    "loads",
    [
        pytest.param([Load("a", backlog=2), Load("b", backlog=2), Load("c", backlog=2)], id="equal-weights"),
        pytest.param([Load("a", backlog=2, weight=1), Load("b", backlog=2, weight=3)], id="weights-1-3"),
        pytest.param(
            [Load("light", every=10.0), Load("h1", backlog=2), Load("h2", backlog=2)], id="light-among-heavies"
        ),
        pytest.param(
            [Load("light", every=10.0), Load("h1", backlog=2, weight=1), Load("h3", backlog=2, weight=3)],
            id="light-among-weighted-heavies",
        ),
        pytest.param(
            [Load("short", backlog=2, cost=0.5), Load("long", backlog=2, cost=2.0)], id="unequal-costs"
        ),
        pytest.param(
            [Load("small", backlog=2, cost=0.3, weight=2), Load("big", backlog=3, cost=1.7, weight=1),
             Load("mid", every=2.0, cost=0.4)],
            id="mixed",
        ),
    ],
)
def test_gpu_time_shares_match_max_min_fair_oracle(loads: list[Load]) -> None:
    sim = Sim(loads)
    sim.run(1000.0)
    assert_fair_shares(sim, Counter(), 1000.0)


def test_service_is_counted_in_measured_gpu_time() -> None:
    # "liar" estimates 1.0 s per job but uses 0.1 s: it is charged 0.1, so it runs ten
    # jobs for each of the honest client's, and GPU time is still split evenly.
    sim = Sim([Load("liar", backlog=2, cost=1.0, actual=0.1), Load("honest", backlog=2, cost=1.0)])
    sim.run(1000.0)
    assert_fair_shares(sim, Counter(), 1000.0)
    assert sim.served["liar"] == pytest.approx(500.0, rel=TOLERANCE)


def test_measured_cost_settles_usage() -> None:
    clock = FakeClock()
    store = MemoryUsageStore()
    sched = FairScheduler(clock=clock, limits=lambda c: OPEN, store=store)
    assert sched.submit("j", key("a"), cost=1.0).ok
    assert store.usage("key:a", clock())[0] == pytest.approx(1.0)  # reserved up front
    sched.dispatch()
    clock.advance(0.1)
    sched.finish("j", gpu_s=0.1)
    assert store.usage("key:a", clock())[0] == pytest.approx(0.1)
    assert sched.client_stats("key:a")["used"] == pytest.approx(0.1)
    sched.finish("j", gpu_s=5.0)  # a second finish is ignored
    assert store.usage("key:a", clock())[0] == pytest.approx(0.1)


def test_fifty_sessions_of_one_address_share_one_flow() -> None:
    # Fifty cookie-minting sessions from one address, each always submitting, against
    # one session from another address: the two addresses split the GPU evenly.
    anon = replace(OPEN, max_queued=4)
    loads = [Load(f"s{i}", kind="session", address="10.0.0.1", backlog=1, fresh_ids=True, tier=anon) for i in range(50)]
    loads.append(Load("alone", kind="session", address="10.0.0.2", backlog=1, tier=anon))
    sim = Sim(loads)
    sim.run(1000.0)
    assert_fair_shares(sim, Counter(), 1000.0, group={load.name: load.address for load in loads})
    assert sim.refusals and all(r.outcome is Outcome.QUEUE_FULL for r in sim.refusals)


def test_sessions_of_one_address_split_its_share() -> None:
    loads = [Load(f"s{i}", kind="session", address="10.0.0.1", backlog=1, cost=0.5 + i) for i in range(3)]
    loads.append(Load("key", backlog=2))
    sim = Sim(loads)
    sim.run(1200.0)
    served = sim.served_until_now()
    assert served["key"] / 1200 == pytest.approx(0.5, abs=TOLERANCE)
    for i in range(3):  # the address's half, split three ways in GPU time
        assert served[f"s{i}"] / 1200 == pytest.approx(0.5 / 3, abs=TOLERANCE)


def test_flooding_client_does_not_delay_a_light_one() -> None:
    sim = Sim([Load("flood", burst=40, cost=0.1), Load("light", burst=1, cost=0.1, start=0.2)])
    sim.run(10.0)
    light = next(j for j in sim.submitted if j.startswith("light"))
    # At most the job in progress, then its own.
    assert sim.ended[light] - sim.submitted[light] <= 0.1 + 0.1 + 1e-9
    assert sim.served["flood"] == pytest.approx(4.0)


def test_idle_client_cannot_bank_credit() -> None:
    # "late" is idle for 100 s while "busy" runs; once it arrives it gets half, not all.
    sim = Sim([Load("busy", backlog=2), Load("late", backlog=2, start=100.0)])
    sim.run(100.0)
    before = sim.served_until_now()
    sim.run(120.0)
    served = sim.served_until_now()
    assert served["late"] - before["late"] == pytest.approx(10.0, abs=1.0)


def test_weight_change_applies_at_next_dispatch() -> None:
    sim = Sim([Load("a", backlog=2), Load("b", backlog=2)])
    sim.run(100.0)
    assert_fair_shares(sim, Counter(), 100.0)
    sim.tiers["a"] = replace(sim.tiers["a"], weight=3.0)  # an operator override
    before = sim.served_until_now()
    sim.run(600.0)
    assert_fair_shares(sim, before, 500.0)


def test_max_running_change_applies_at_next_dispatch() -> None:
    tier = replace(OPEN, max_running=1)
    sched = FairScheduler(clock=FakeClock(), limits=lambda c: tier, store=MemoryUsageStore(), capacity=2)
    for i in range(3):
        assert sched.submit(f"j{i}", key("a"), 1.0).ok
    assert len(sched.dispatch()) == 1
    assert sched.dispatch() == []  # a slot is free, but a is at max_running
    tier = replace(tier, max_running=2)
    assert [j.job_id for j in sched.dispatch()] == ["j1"]


# --------------------------------------------------------------------------------------
# Admission limits


def make(tier: Tier, capacity: int = 1) -> tuple[FairScheduler, FakeClock, MemoryUsageStore]:
    clock, store = FakeClock(), MemoryUsageStore()
    return FairScheduler(clock=clock, limits=lambda c: tier, store=store, capacity=capacity), clock, store


def test_max_queued_refuses_with_positive_retry() -> None:
    sched, clock, _ = make(replace(OPEN, max_queued=2))
    assert sched.submit("a0", key("a"), 2.0).ok
    assert sched.submit("a1", key("a"), 2.0).ok
    refused = sched.submit("a2", key("a"), 2.0)
    assert refused.outcome is Outcome.QUEUE_FULL and not refused.ok
    assert refused.retry_after_s >= 2.0
    assert "max_queued=2" in refused.reason and "2 requests" in refused.reason
    assert sched.submit("b0", key("b"), 2.0).ok  # another client is not affected
    sched.dispatch()  # a0 leaves the queue
    assert sched.submit("a2", key("a"), 2.0).ok


def test_queue_full_retry_is_eta_of_first_queued_job() -> None:
    sched, clock, _ = make(replace(OPEN, max_queued=1))
    assert sched.submit("b0", key("b"), 5.0).ok
    sched.dispatch()  # b0 runs for 5 s
    assert sched.submit("a0", key("a"), 1.0).ok
    clock.advance(1.0)
    refused = sched.submit("a1", key("a"), 1.0)
    assert refused.outcome is Outcome.QUEUE_FULL
    assert refused.retry_after_s == pytest.approx(4.0)  # a0 starts when b0 ends


def test_requests_per_minute_refuses_with_retry() -> None:
    sched, clock, _ = make(replace(OPEN, requests_per_minute=3))
    for i in range(3):
        assert sched.submit(f"j{i}", key("a"), 1.0).ok
        sched.dispatch()
        clock.advance(1.0)
        sched.finish(f"j{i}", 1.0)
        clock.advance(9.0)
    refused = sched.submit("j3", key("a"), 1.0)  # at t=30; the oldest was at t=0
    assert refused.outcome is Outcome.RATE_LIMITED
    assert refused.retry_after_s == pytest.approx(30.0)
    assert "requests_per_minute=3" in refused.reason
    clock.now = 60.0
    assert sched.submit("j3", key("a"), 1.0).ok


def test_requests_per_minute_is_per_address_for_sessions() -> None:
    sched, clock, _ = make(replace(OPEN, requests_per_minute=2))
    assert sched.submit("x", session("s1"), 1.0).ok
    assert sched.submit("y", session("s2"), 1.0).ok
    assert sched.submit("z", session("s3"), 1.0).outcome is Outcome.RATE_LIMITED
    assert sched.submit("w", session("s4", address="10.0.0.2"), 1.0).ok


def test_gpu_seconds_refuses_until_window_resets() -> None:
    sched, clock, store = make(replace(OPEN, gpu_seconds=2.0, window_s=100.0))
    assert sched.submit("j0", key("a"), 1.0).ok
    clock.now = 10.0
    assert sched.submit("j1", key("a"), 1.0).ok
    clock.now = 20.0
    refused = sched.submit("j2", key("a"), 1.0)
    assert refused.outcome is Outcome.QUOTA_EXCEEDED
    assert refused.retry_after_s == pytest.approx(80.0)
    assert "gpu_seconds=2" in refused.reason
    clock.now = 100.0
    assert sched.submit("j2", key("a"), 1.0).ok


def test_request_larger_than_whole_quota_says_so() -> None:
    sched, _, _ = make(replace(OPEN, gpu_seconds=2.0, window_s=100.0))
    refused = sched.submit("j", key("a"), 3.0)
    assert refused.outcome is Outcome.QUOTA_EXCEEDED and "more than the whole quota" in refused.reason


def test_address_gpu_seconds_is_shared_by_sessions_of_one_address() -> None:
    tier = replace(OPEN, gpu_seconds=2.0, address_gpu_seconds=3.0, window_s=100.0)
    sched, clock, store = make(tier)
    for i in range(3):
        assert sched.submit(f"j{i}", session(f"s{i}"), 1.0).ok
    refused = sched.submit("j3", session("s3"), 1.0)  # a fresh cookie does not help
    assert refused.outcome is Outcome.QUOTA_EXCEEDED
    assert "address_gpu_seconds=3" in refused.reason
    assert refused.retry_after_s == pytest.approx(100.0)
    assert store.usage("session:s3", clock())[0] == 0.0  # its own reservation was released
    assert store.usage(address_usage_key("10.0.0.1"), clock())[0] == pytest.approx(3.0)
    assert sched.submit("j4", session("s4", address="10.0.0.2"), 1.0).ok
    stats = sched.client_stats("session:s0")
    assert stats["address"]["remaining"] == 0.0 and stats["remaining"] == 0.0


def test_address_client_and_address_ceiling_are_counted_apart() -> None:
    tier = replace(OPEN, gpu_seconds=2.0, address_gpu_seconds=3.0, window_s=100.0)
    sched, clock, store = make(tier)
    bare = ClientRef("addr:10.0.0.1", "address", "anonymous", "10.0.0.1")
    assert sched.submit("j0", bare, 1.0).ok
    assert sched.submit("j1", session("s1"), 1.0).ok
    assert store.usage("addr:10.0.0.1", clock())[0] == pytest.approx(1.0)
    assert store.usage(address_usage_key("10.0.0.1"), clock())[0] == pytest.approx(2.0)


def test_duplicate_job_id() -> None:
    sched, _, store = make(OPEN)
    assert sched.submit("j", key("a"), 1.0).ok
    dup = sched.submit("j", key("b"), 1.0)
    assert dup.outcome is Outcome.DUPLICATE and dup.reason
    assert store.usage("key:b", 0.0)[0] == 0.0
    sched.dispatch()
    assert sched.submit("j", key("a"), 1.0).outcome is Outcome.DUPLICATE  # still running


# --------------------------------------------------------------------------------------
# Cancel, work conservation, positions, batching


def test_cancel_queued_job_releases_reservation_and_never_runs() -> None:
    sched, clock, store = make(replace(OPEN, address_gpu_seconds=10.0))
    assert sched.submit("a", session("s1"), 1.0).ok
    assert sched.submit("b", session("s2"), 2.0).ok
    [running] = sched.dispatch()
    assert running.job_id == "a"
    assert sched.cancel("b") is True
    assert sched.cancel("b") is False
    assert store.usage("session:s2", clock())[0] == 0.0
    assert store.usage(address_usage_key("10.0.0.1"), clock())[0] == pytest.approx(1.0)
    assert sched.position("b") is None and len(sched) == 0
    assert sched.cancel("a") is False  # running: the caller must wait for it
    sched.finish("a", 1.0)
    assert sched.dispatch() == []
    assert sched.cancel("nope") is False


def test_executor_never_idles_while_eligible_work_waits() -> None:
    tier = replace(OPEN, max_running=1)
    sched, _, _ = make(tier, capacity=3)
    for i in range(3):
        assert sched.submit(f"a{i}", key("a"), 1.0).ok  # a can use one slot only
    assert sched.submit("b0", key("b"), 1.0).ok
    assert sched.submit("c0", key("c"), 1.0).ok
    started = [job.job_id for _ in range(5) for job in sched.dispatch()]
    assert sorted(started) == ["a0", "b0", "c0"]
    assert sched.free_slots == 0 and sched.running_count == 3 and len(sched) == 2
    sched.finish("b0", 1.0)
    assert sched.dispatch() == []  # only a waits, and a is at max_running
    sched.finish("a0", 1.0)
    assert [j.job_id for j in sched.dispatch()] == ["a1"]


def test_position_and_eta_predict_the_dispatch_order() -> None:
    sched, clock, _ = make(replace(OPEN, weight=1.0))
    assert sched.submit("r", key("r"), 2.0).ok
    sched.dispatch()  # r runs from 0 to 2
    clock.now = 0.5
    costs = {"a": [1.0, 1.0, 1.0], "b": [0.5, 0.5, 2.0, 0.5], "c": [3.0]}
    for name, jobs in costs.items():
        for i, cost in enumerate(jobs):
            assert sched.submit(f"{name}{i}", key(name), cost).ok
    predicted = {job_id: sched.position(job_id) for name in costs for job_id in (f"{name}{i}" for i in range(len(costs[name])))}
    assert sorted(place for place, _ in predicted.values()) == list(range(1, 9))
    assert sched.position("r") is None

    clock.now = 2.0
    sched.finish("r", 2.0)
    order = []
    while (batch := sched.dispatch()):
        [job] = batch
        order.append(job.job_id)
        place, eta = predicted[job.job_id]
        assert place == len(order)
        assert clock.now == pytest.approx(0.5 + eta)
        clock.advance(job.cost)
        sched.finish(job.job_id, job.cost)
    assert len(order) == 8
    assert order[0] != "c0"  # fair, not FIFO over the flows' heads
    # Each client's jobs keep their own order.
    for name in costs:
        mine = [j for j in order if j.startswith(name)]
        assert mine == sorted(mine)


def test_position_is_cached_until_the_state_changes() -> None:
    calls = []
    sched, clock, _ = make(OPEN)

    for i in range(3):
        sched.submit(f"j{i}", key(f"c{i}"), 1.0)
    original = sched._replay
    sched._replay = lambda: (calls.append(1), original())[1]  # type: ignore[method-assign]
    for _ in range(5):
        assert sched.position("j2") == (3, 2.0)
    assert sched._order is not None
    version = sched._order.version
    sched.submit("j3", key("c3"), 1.0)
    assert sched.position("j3") == (4, 3.0)
    assert sched._order.version != version


def test_batch_groups_same_key_from_other_clients_in_one_slot() -> None:
    sched, clock, store = make(replace(OPEN, max_running=4), capacity=2)
    assert sched.submit("a0", key("a"), 1.0, batch_key="512").ok
    assert sched.submit("a1", key("a"), 1.0, batch_key="512").ok  # same client: not batched
    assert sched.submit("b0", key("b"), 2.0, batch_key="768").ok  # other shape
    assert sched.submit("c0", key("c"), 3.0, batch_key="512").ok
    assert sched.submit("d0", key("d"), 4.0, batch_key="512").ok
    assert sched.submit("c1", key("c"), 1.0, batch_key="512").ok  # c is in already
    assert sched.submit("e0", key("e"), 1.0, batch_key=None).ok
    batch = sched.dispatch(max_batch=4)
    assert [j.job_id for j in batch] == ["a0", "c0", "d0"]
    assert sched.free_slots == 1 and sched.running_count == 3
    assert [j.job_id for j in sched.dispatch(max_batch=4)] == ["b0"]
    assert sched.dispatch(max_batch=4) == []  # no slot: the batch holds only one
    for job in batch[:-1]:
        sched.finish(job.job_id, job.cost)
    assert sched.dispatch(max_batch=4) == []  # the batch's slot is held until all finish
    sched.finish("d0", 4.0)
    assert [j.job_id for j in sched.dispatch(max_batch=4)] == ["e0"]
    # Each was charged its own cost: usage, and the fair order afterwards.
    assert {c: store.usage(f"key:{c}", clock())[0] for c in "cd"} == {"c": 3.0 + 1.0, "d": 4.0}  # + c1 reserved
    assert sched.submit("d1", key("d"), 1.0).ok
    assert sched.position("c1")[0] < sched.position("d1")[0]


def test_batch_fills_up_to_max_batch() -> None:
    sched, _, _ = make(OPEN)
    for i in range(6):
        assert sched.submit(f"j{i}", key(f"c{i}"), 1.0, batch_key="k").ok
    assert len(sched.dispatch(max_batch=4)) == 4
    assert len(sched) == 2


def test_stats_and_depth() -> None:
    tiers = {"free": replace(OPEN, gpu_seconds=10.0), "pro": replace(OPEN, gpu_seconds=100.0, max_running=2)}
    clock, store = FakeClock(), MemoryUsageStore()
    sched = FairScheduler(clock=clock, limits=lambda c: tiers[c.tier], store=store)
    assert sched.submit("f0", key("f", "free"), 1.0).ok
    assert sched.submit("f1", key("f", "free"), 1.0).ok
    assert sched.submit("p0", key("p", "pro"), 4.0).ok
    sched.dispatch()
    stats = sched.client_stats("key:f")
    assert stats["tier"] == "free" and stats["limits"]["gpu_seconds"] == 10.0
    assert (stats["queued"], stats["running"]) == (1, 1)
    assert stats["used"] == 2.0 and stats["remaining"] == 8.0 and stats["resets_in_s"] == 3600.0
    assert sched.depth_by_tier() == {"free": (1, 1), "pro": (1, 0)}
    assert {c["client_id"] for c in sched.clients()} == {"key:f", "key:p"}
    unseen = sched.client_stats(key("new", "pro"))
    assert unseen["used"] == 0.0 and unseen["limits"]["gpu_seconds"] == 100.0


def test_bad_capacity_and_tiny_costs() -> None:
    with pytest.raises(ValueError):
        make(OPEN, capacity=0)
    sched, _, _ = make(OPEN)
    assert sched.submit("z", key("a"), 0.0).ok
    [job] = sched.dispatch()
    assert job.cost > 0
