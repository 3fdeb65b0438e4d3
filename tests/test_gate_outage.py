"""A job that never runs leaves its flow uncharged, while Redis is away and after (issue 12).

A flow's fair-share service is charged when its job starts (``start_job``: in Redis, or
in the tier's memory while Redis is down). These tests follow jobs that are refused or
whose caller leaves before they run, through a GPU tier's real parts in this process
(``CallService.enter_call`` with the built-in app's ``generate``, the runner, the fair
scheduler, ``GlobalLimits`` over the resilient stores, wired as ``gpu_backend/app.py``
wires them) on a real ``redis-server`` that is stopped or hung (SIGSTOP), and check the
service counters in memory and, once Redis is back, in Redis: nothing charged for such a
job, nothing charged twice.

The model is ``tests/test_gpu_service.py``'s stand-in, held on a gate, so that "has it
run?" is a fact (its calls), not a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from splitspace.gpu_backend.admission.runner import GpuRunner, Ticket
from splitspace.gpu_backend.admission.scheduler import FairScheduler
from splitspace.gpu_backend.serving.service import CallService
from splitspace.gpu_backend.stores.global_limits import VTIME_KEY, GlobalLimits, local_limits
from splitspace.gpu_backend.stores.redis_store import RedisStore
from splitspace.gpu_backend.stores.resilient_store import CircuitBreaker, ResilientStore
from splitspace.gpu_backend.stores.usage import MemoryUsageStore, StoreUnavailable
from splitspace.gpu_backend.workload.app_functions import AppFunction
from splitspace.session.token import IdentityTokens
from splitspace.shared.contract.calls import CallResult
from splitspace.shared.contract.errors import QUEUE_FULL, ServiceUnavailable, Throttled
from splitspace.shared.contract.quotas import Tier
from tests.builtin_functions import builtin_functions
from tests.clients import generate_call
from tests.support import wait_for
from tests.test_gpu_service import FIELDS, SECRET, FakeModel, token

CLIENT = "key:outage"  # token("outage") is this client; its flow has the same name
BOUND_S = 10.0
"""Longest any condition here may take (each call to a hung Redis costs a 0.5 s timeout)."""


def every_call_probes() -> Callable[[], float]:
    """A breaker clock that runs 10 s ahead at each reading: after a failure the next call
    is already the probe, so every call tries Redis (a hung Redis: waits its timeout), as
    when a Redis hangs just before that call. Makes "its start waits on Redis" certain."""
    return functools.partial(next, itertools.count(0.0, 10.0))


@dataclass
class Tier1:
    """One GPU tier in this process and what the tests look at."""

    service: CallService
    gate: GlobalLimits
    store: ResilientStore
    model: FakeModel
    peer: RedisStore  # Redis as another replica sees it
    prefix: str
    url: str
    generate: AppFunction

    def shared_service(self, flows: list[str]) -> dict[str, float]:
        """The flows' service counters in Redis (``{prefix}svc:{flow}``), read directly."""
        client = redis.Redis.from_url(self.url, decode_responses=True)
        try:
            values = client.mget([f"{self.prefix}svc:{flow}" for flow in flows])
        finally:
            client.close()
        return {flow: float(v) for flow, v in zip(flows, values, strict=True) if v is not None}

    @property
    def memory(self) -> MemoryUsageStore:
        return self.store.fallback

    @property
    def runner(self) -> GpuRunner:
        return self.service.runner

    async def enter(self, **fields: object) -> Ticket:
        call = generate_call(**{**FIELDS, **fields})
        return await self.service.enter_call(self.service.arrive(token("outage", **fields)), call)

    def estimate(self) -> float:
        """One job's cost estimate, as admission and dispatch charge it (before any run)."""
        return self.generate.prepare(generate_call(**FIELDS)).cost

    def serves_from_redis(self) -> bool:
        try:
            self.store.count("queued", "probe")
        except StoreUnavailable:
            return False
        return not self.store.breaker.is_open


@contextlib.asynccontextmanager
async def gpu_tier(
    url: str, *, mode: str, replicas: int, tier: Tier, capacity: int = 1, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[Tier1]:
    prefix = f"test:{uuid.uuid4().hex}:"
    stack = contextlib.ExitStack()
    breaker = CircuitBreaker(0.5, clock=clock)  # one outage verdict for the loop and the GPU thread
    store = ResilientStore(
        RedisStore.from_url(url, prefix=prefix),
        mode=mode,  # type: ignore[arg-type]
        replicas=replicas,
        breaker=breaker,
    )
    model = FakeModel(gate=threading.Event())
    runner: GpuRunner | None = None
    gate = GlobalLimits(
        store=store,
        limits=lambda ref: tier,
        on_retry=lambda: runner.dispatch() if runner is not None else None,
    )
    scheduler = FairScheduler(
        clock=time.time,
        limits=local_limits(lambda ref: tier),
        store=MemoryUsageStore(),
        capacity=capacity,
        held=gate.held,
        service_floor=gate.service_floor,
    )
    runner = GpuRunner(scheduler, clock=time.time, gate=gate)
    functions = stack.enter_context(builtin_functions(model))
    service = CallService(
        tokens=IdentityTokens([SECRET]),
        runner=runner,
        standing=lambda identity: {},
        global_limits=gate,
        functions=functions,
    )
    peer = RedisStore.from_url(url, prefix=prefix)
    try:
        yield Tier1(service, gate, store, model, peer, prefix, url, functions["generate"])
    finally:
        assert model.gate is not None
        model.gate.set()
        runner.close()
        gate.close()
        store.close()
        await store.aclose()
        peer.close()
        stack.close()


async def until(condition: Callable[[], Any]) -> Any:
    """Poll ``condition`` off the loop (the loop keeps running the tier) until it holds."""
    return await asyncio.to_thread(wait_for, condition, BOUND_S, 0.02)


async def result_of(tier: Tier1, ticket: Ticket) -> Any:
    updates = tier.service.follow(ticket)
    try:
        return [u async for u in updates][-1]
    finally:
        await updates.aclose()


def ran(tier: Tier1) -> list[str]:
    return [r.prompt for call in tier.model.calls for r in call]


def settled(tier: Tier1, charged: float) -> bool:
    """The running job's finish is settled in memory (Redis away): its flow's service has
    moved from its start's charge by the correction, measured minus estimated."""
    return tier.gate.leases() == [] and tier.memory.service([CLIENT]).get(CLIENT) != pytest.approx(charged)


# -- the gap: a caller who leaves while its job's start waits on a hung Redis ----------------


def test_a_job_left_while_its_start_waits_on_a_hung_redis_never_runs_and_is_not_charged(own_redis: Any) -> None:
    tier = Tier(weight=1, max_running=1, max_queued=4, gpu_seconds=1e6, window_s=3600)

    async def scenario() -> None:
        async with gpu_tier(own_redis.url, mode="local", replicas=1, tier=tier, clock=every_call_probes()) as t:
            own_redis.pause()
            try:
                leaver = await t.enter(prompt="left")  # admitted in memory after a timeout
                assert t.runner.scheduler.position(leaver.job_id) is None  # dispatched: its start waits
                t.service.drop(leaver)  # the caller leaves before the start is decided
                assert await until(lambda: t.model.entered.is_set() or leaver.waiter.future.done())
                assert ran(t) == [] and leaver.waiter.future.cancelled()  # granted in memory, not run
                assert len(t.runner.scheduler) == 0 and t.runner.scheduler.running_count == 0
                # its start's charge (cost / weight) taken back where it was made: in memory
                assert t.memory.service([CLIENT]) == {CLIENT: pytest.approx(0.0, abs=1e-9)}
                assert t.memory.usage(CLIENT)[0] == pytest.approx(0.0, abs=1e-9)  # reservation back
                assert t.memory.slot_counts() == {}
                assert t.gate.leases() == []
            finally:
                own_redis.resume()
            assert await until(t.serves_from_redis)
            assert t.shared_service([CLIENT, VTIME_KEY]) == {}  # Redis: nothing replayed, nothing charged
            assert t.peer.usage(CLIENT)[0] == 0.0 and t.peer.slot_counts() == {}

            again = await t.enter(prompt="after")  # and the tier serves on
            assert t.model.gate is not None
            t.model.gate.set()
            assert isinstance(await result_of(t, again), CallResult)
            assert ran(t) == ["after"]

    asyncio.run(scenario())


def test_a_job_left_while_its_refused_start_waits_on_a_hung_redis_is_dropped_not_requeued(own_redis: Any) -> None:
    # max_running 2 on 2 replicas: 1 here while Redis is down; the tier has two GPU slots
    tier = Tier(weight=1, max_running=2, max_queued=4, gpu_seconds=1e6, window_s=3600)

    async def scenario() -> None:
        async with gpu_tier(
            own_redis.url, mode="local", replicas=2, tier=tier, capacity=2, clock=every_call_probes()
        ) as t:
            own_redis.pause()
            try:
                first = await t.enter(prompt="runs")
                assert await asyncio.to_thread(t.model.entered.wait, BOUND_S)  # on the GPU, held
                cost = t.estimate()
                leaver = await t.enter(prompt="left", seed=8)
                assert t.runner.scheduler.position(leaver.job_id) is None  # on the second slot
                t.service.drop(leaver)  # while its start waits (memory will refuse: 1 running)
                assert await until(
                    lambda: leaver.waiter.future.done() or t.runner.scheduler.position(leaver.job_id) is not None
                )
                assert leaver.waiter.future.cancelled()  # dropped, not back in the queue
                assert t.runner.scheduler.position(leaver.job_id) is None
                assert len(t.runner.scheduler) == 0 and t.runner.scheduler.running_count == 1  # the first
                assert await until(lambda: t.memory.usage(CLIENT)[0] == pytest.approx(cost))  # its estimate back
                assert t.memory.count("queued", CLIENT) == 0  # and its lease
                assert t.memory.service([CLIENT]) == {CLIENT: pytest.approx(cost / tier.weight)}  # the first only
                assert t.model.gate is not None
                t.model.gate.set()
                assert isinstance(await result_of(t, first), CallResult)
                assert await until(lambda: settled(t, cost / tier.weight))
                assert ran(t) == ["runs"]  # the leaver never ran, not even later
            finally:
                own_redis.resume()
            assert await until(t.serves_from_redis)
            assert t.shared_service([CLIENT, VTIME_KEY]) == {}  # nothing replayed into Redis
            assert t.peer.slot_counts() == {}

    asyncio.run(scenario())


# -- no gap: refused at admission, dropped while queued, failed at its start -----------------


def test_jobs_refused_or_dropped_while_queued_during_an_outage_charge_nothing(own_redis: Any) -> None:
    # local mode, 2 replicas: max_queued 4 is 2 here while Redis is down
    tier = Tier(weight=2, max_running=1, max_queued=4, gpu_seconds=1e6, window_s=3600)

    async def scenario() -> None:
        async with gpu_tier(own_redis.url, mode="local", replicas=2, tier=tier) as t:
            own_redis.stop()
            running = await t.enter(prompt="runs")
            assert await asyncio.to_thread(t.model.entered.wait, BOUND_S)
            cost = t.estimate()
            queued = [await t.enter(prompt="dropped", seed=s) for s in (8, 9)]  # 2 queued: the share
            with pytest.raises(Throttled) as refused:
                await t.enter(prompt="refused", seed=10)
            assert refused.value.title == QUEUE_FULL
            for ticket in queued:
                t.service.drop(ticket)
            assert await until(lambda: t.memory.usage(CLIENT)[0] == pytest.approx(cost))  # their estimates back
            assert t.memory.count("queued", CLIENT) == 0
            # the running job's start only: S = cost / weight
            assert t.memory.service([CLIENT]) == {CLIENT: pytest.approx(cost / tier.weight)}
            assert t.model.gate is not None
            t.model.gate.set()
            assert isinstance(await result_of(t, running), CallResult)
            assert await until(lambda: settled(t, cost / tier.weight))
            assert ran(t) == ["runs"]

            own_redis.start()  # empty: nothing of the outage is replayed into it
            assert await until(t.serves_from_redis)
            assert t.shared_service([CLIENT, VTIME_KEY]) == {}

    asyncio.run(scenario())


def test_closed_mode_a_queued_job_that_cannot_start_is_not_charged(own_redis: Any) -> None:
    tier = Tier(weight=1, max_running=1, max_queued=4, gpu_seconds=1e6, window_s=3600)

    async def scenario() -> None:
        async with gpu_tier(own_redis.url, mode="closed", replicas=2, tier=tier) as t:
            running = await t.enter(prompt="runs")  # Redis up: charged in Redis at its start
            assert await asyncio.to_thread(t.model.entered.wait, BOUND_S)
            cost = t.estimate()
            queued = await t.enter(prompt="fails", seed=8)
            assert t.shared_service([CLIENT])[CLIENT] == pytest.approx(cost)
            own_redis.pause()  # hung: its data is kept
            try:
                with pytest.raises(ServiceUnavailable):
                    await t.enter(prompt="refused", seed=9)  # refused: nothing checked, nothing taken
                assert t.model.gate is not None
                t.model.gate.set()  # the first finishes; the queued one's start cannot be checked
                assert isinstance(await result_of(t, running), CallResult)
                with pytest.raises(ServiceUnavailable):
                    await result_of(t, queued)
                assert ran(t) == ["runs"] and len(t.runner.scheduler) == 0
            finally:
                own_redis.resume()
            assert await until(t.serves_from_redis)
            # Redis holds the first job's start charge only: the failed and the refused added nothing
            assert t.shared_service([CLIENT])[CLIENT] == pytest.approx(cost)

    asyncio.run(scenario())
