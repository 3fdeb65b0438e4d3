"""What both tiers keep per client is bounded by what is active (issue 21, item 6).

In process, on a fake clock: a client idle for ``idle_s`` is forgotten, at most
``max_idle`` idle clients are remembered, and nothing a client is owed is lost (an
active client's queued work and place, its rate window, its quota usage in the store).
"""

from __future__ import annotations

import math

from splitspace.cpu_frontend.door.limits import InflightCaps
from splitspace.gpu_backend.admission.scheduler import ClientRef, FairScheduler, Outcome
from splitspace.gpu_backend.stores.usage import MemoryUsageStore
from splitspace.session.identity import Identity
from splitspace.shared.contract.quotas import QuotaConfig, Tier
from tests.test_scheduler import FakeClock

TIER = Tier(weight=1, max_running=1, max_queued=8, gpu_seconds=math.inf, window_s=3600)


def addr(i: int) -> ClientRef:
    ip = f"2001:db8::{i:x}"
    return ClientRef(client_id=f"addr:{ip}", kind="address", tier="anonymous", address=ip)


def visitor(i: int) -> Identity:
    ip = f"2001:db8::{i:x}"
    return Identity(f"addr:{ip}", "address", "anonymous", ip)


def run_one(sched: FairScheduler, clock: FakeClock, client: ClientRef, job_id: str, gpu_s: float = 1.0) -> None:
    """A client comes, runs one job alone, and goes (its service ends ahead of virtual time)."""
    assert sched.submit(job_id, client, gpu_s).ok
    (job,) = sched.dispatch()
    clock.advance(gpu_s)
    sched.finish(job.job_id, gpu_s)


def test_the_scheduler_forgets_a_client_idle_for_idle_s():
    clock = FakeClock()
    sched = FairScheduler(clock=clock, limits=lambda c: TIER, store=MemoryUsageStore(clock=clock), idle_s=600)
    for i in range(50):  # one after another: virtual time never passes their service
        run_one(sched, clock, addr(i), f"j{i}")
    assert sched.forget_idle() == 100  # 50 flows and their clients: idle for less than 600 s
    clock.advance(600)
    run_one(sched, clock, addr(999), "last")  # the sweep runs with the tier's own work too
    assert sched.forget_idle() == 2  # only the last client is left
    assert len(sched.clients()) == 51  # the operators still see every client with usage in its window
    clock.advance(3600)
    sched.forget_idle()
    assert sched.clients() == []


def test_idle_clients_are_bounded_in_count_and_active_ones_kept():
    clock = FakeClock()
    sched = FairScheduler(clock=clock, limits=lambda c: TIER, store=MemoryUsageStore(clock=clock), max_idle=100)
    assert sched.submit("long", addr(0), 1.0).ok
    (running,) = sched.dispatch()  # addr 0 runs for the whole test
    assert sched.submit("waits", addr(1), 1.0).ok  # addr 1 waits behind everyone
    for i in range(2, 5000):  # thousands of clients come and go meanwhile, each with a job
        assert sched.submit(f"j{i}", addr(i), 0.01).ok
        assert sched.cancel(f"j{i}")
        clock.advance(1.0)
    assert sched.forget_idle() <= 100 + 4  # at most max_idle idle ones, and the two active clients
    assert sched.position("waits") == (1, 0.0)  # still queued, first in line
    assert sched.client_stats(addr(0))["running"] == 1 and sched.client_stats(addr(1))["queued"] == 1
    sched.finish(running.job_id, 1.0)
    assert [job.job_id for job in sched.dispatch()] == ["waits"]


def test_a_forgotten_client_keeps_its_rate_window_and_its_usage():
    clock = FakeClock()
    store = MemoryUsageStore(clock=clock)
    tier = Tier(weight=1, max_running=1, max_queued=8, gpu_seconds=10, window_s=3600, requests_per_minute=1)
    sched = FairScheduler(clock=clock, limits=lambda c: tier, store=store, idle_s=1)
    client = addr(1)
    run_one(sched, clock, client, "first", gpu_s=4.0)
    clock.advance(30)
    sched.forget_idle()  # idle for 30 s > idle_s, but its rate window still counts a request
    refused = sched.submit("second", client, 1.0)
    assert refused.outcome is Outcome.RATE_LIMITED
    clock.advance(31)
    assert sched.forget_idle() == 0  # now it goes
    assert sched.client_stats(client)["used"] == 4.0  # the quota's usage lives in the store
    assert sched.submit("third", client, 7.0).outcome is Outcome.QUOTA_EXCEEDED  # 4 + 7 > 10
    assert sched.submit("fourth", client, 6.0).ok


def test_the_usage_store_drops_only_windows_that_ended():
    clock = FakeClock()
    store = MemoryUsageStore(clock=clock)
    assert store.reserve("addr:a", 2.0, 10, 60) is None
    clock.advance(30)
    assert store.reserve("addr:b", 3.0, 10, 60) is None
    clock.advance(40)  # a's window ended, b's has 20 s left
    assert store.forget_expired() == 1
    assert store.usage("addr:a") == (0.0, 0.0) and store.usage("addr:b") == (3.0, 20.0)
    assert store.usage_keys() == ["addr:b"]


def test_the_frontend_forgets_a_learned_cap_after_idle_s():
    clock = FakeClock()
    caps = InflightCaps(QuotaConfig, idle_s=600, clock=clock)
    quiet, busy = visitor(1), visitor(2)
    from_file = caps.terms(quiet).cap
    caps.learn(quiet, 0)  # e.g. an operator blocked both
    caps.learn(busy, 0)
    clock.advance(400)
    caps.learn(busy, 0)  # busy is heard from again (its requests' updates)
    assert caps.terms(quiet).cap == 0
    clock.advance(300)
    assert caps.terms(quiet).cap == from_file  # forgotten: the quota file's cap until the next word
    assert caps.terms(busy).cap == 0 and len(caps) == 1


def test_the_frontend_keeps_at_most_max_idle_learned_caps():
    caps = InflightCaps(QuotaConfig, max_idle=100)
    for i in range(100_000):
        caps.learn(visitor(i), 3)
    assert len(caps) == 100
    assert caps.terms(visitor(99_999)).cap == 3  # the most recent are kept


def test_a_client_back_for_a_while_is_idle_from_its_last_job():
    clock = FakeClock()
    sched = FairScheduler(clock=clock, limits=lambda c: TIER, store=MemoryUsageStore(clock=clock), idle_s=600)
    heavy, other = addr(1), addr(2)
    run_one(sched, clock, heavy, "a")  # idle from t=1, its entry queued for the sweep
    clock.advance(500)
    run_one(sched, clock, heavy, "b")  # back, and idle again from t=502 (its old entry still queued)
    clock.advance(200)  # 699 s after its first job, 198 s after its last
    run_one(sched, clock, other, "c")
    assert sched.forget_idle() == 4  # both flows and both clients still remembered
