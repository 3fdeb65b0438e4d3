"""The frontends' shared in-flight cap (``cpu_frontend/door/inflight_ledger.py``) on a real Redis.

Two ledgers on one ``redis-server`` stand for two frontends. Each test has its own key
prefix; the tests that stop, pause or restart Redis have their own server. Conditions are
waited for (polled), never slept on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from splitspace.cpu_frontend.door.inflight_ledger import Hold, NullLedger, RedisLedger, local_share, open_ledger
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.errors import QUEUE_FULL, SERVICE_UNAVAILABLE, ServiceUnavailable, Throttled
from tests.support import free_port

REPO = Path(__file__).resolve().parent.parent
RETRY_S = 0.5
"""The breaker's retry interval here (the default is 3 s)."""
CALL_BOUND_S = 1.5
"""Longest one acquire may take while Redis is away (two 0.5 s timeouts and slack)."""

pytestmark = pytest.mark.serial  # bounds of a fraction of a second: run alone (scripts/test)


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


def ledger(url: str, prefix: str, *, mode: str = "closed", replicas: int = 1, lease_s: float = 30.0) -> RedisLedger:
    settings = Settings(redis_url=url, redis_failure=mode, replicas=replicas, lease_s=lease_s)  # type: ignore[arg-type]
    made = open_ledger(settings, retry_s=RETRY_S, prefix=prefix)
    assert isinstance(made, RedisLedger)
    return made


@contextlib.asynccontextmanager
async def running(url: str, prefix: str, n: int = 1, **options: Any) -> AsyncIterator[list[RedisLedger]]:
    """``n`` started ledgers (frontends) on ``url`` with :func:`ledger`'s ``options``,
    closed when the block ends, however it ends."""
    started: list[RedisLedger] = []
    try:
        for _ in range(n):
            led = ledger(url, prefix, **options)
            await led.start()
            started.append(led)
        yield started
    finally:
        for led in started:
            await led.aclose()


def in_redis(url: str, prefix: str, flow: str) -> dict[str, int]:
    """The flow's leases as Redis holds them, counted by frontend: frontend id -> count."""
    with redis.Redis.from_url(url, decode_responses=True) as client:
        leases = client.zrange(f"{prefix}inflight-leases:{flow}", 0, -1)
    return dict(collections.Counter(lease.partition(":")[0] for lease in leases))


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> float:
    """Poll ``condition`` until it holds; the seconds that took."""
    start = time.monotonic()
    while not await condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def outcome(call: Awaitable[Any]) -> tuple[Any, float]:
    start = time.monotonic()
    try:
        result: Any = await call
    except Exception as exc:  # returned, so that the test asserts on it
        result = exc
    return result, time.monotonic() - start


def can_take(led: RedisLedger, flow: str, cap: int, taken: list[Hold]) -> Callable[[], Awaitable[bool]]:
    """A condition: ``led`` gets a place for ``flow`` (kept in ``taken``); refused for the
    cap or while Redis is still away, not yet."""

    async def check() -> bool:
        try:
            hold = await led.acquire(flow, cap, 0)
        except (Throttled, ServiceUnavailable):
            return False
        assert hold is not None and hold.in_redis
        taken.append(hold)
        return True

    return check


async def drained(led: RedisLedger) -> bool:
    """The ledger is synced, no acquire is at Redis (a cancelled caller's call runs on)
    and no decrement is left to send."""
    return led.synced and not led._calls and not led._pending  # noqa: SLF001 (a test looks inside)


# -- two frontends, one cap ----------------------------------------------------------------


def test_two_frontends_hold_the_cap_together(redis_server: Any, prefix: str) -> None:
    async def scenario() -> None:
        async with running(redis_server.url, prefix, 2) as (a, b):
            held = [await a.acquire("key:f", 4, 0), await a.acquire("key:f", 4, 1), await b.acquire("key:f", 4, 0)]
            held.append(await b.acquire("key:f", 4, 1))
            assert all(h is not None and h.in_redis for h in held)
            for led in (a, b):
                refused, _ = await outcome(led.acquire("key:f", 4, 0))
                assert isinstance(refused, Throttled) and refused.title == QUEUE_FULL
                assert refused.reason == "4 requests already in flight (max_running + max_queued = 4)"
                assert refused.retry_after_s == 1.0
            assert in_redis(redis_server.url, prefix, "key:f") == {a.frontend_id: 2, b.frontend_id: 2}
            assert await a.acquire("key:other", 4, 0) is not None  # flows are apart

            # a burst at both at once: exactly the cap, never over
            results = await asyncio.gather(
                *(led.acquire("key:burst", 5, 0) for led in (a, b) * 12), return_exceptions=True
            )
            granted = [r for r in results if isinstance(r, Hold)]
            assert len(granted) == 5, results
            assert all(isinstance(r, Throttled) for r in results if not isinstance(r, Hold))
            assert sum(in_redis(redis_server.url, prefix, "key:burst").values()) == 5
            zero, _ = await outcome(a.acquire("key:none", 0, 0))
            assert isinstance(zero, Throttled)  # a cap of 0 admits nothing

    asyncio.run(scenario())


def test_a_release_frees_a_place_for_every_frontend(redis_server: Any, prefix: str) -> None:
    async def scenario() -> None:
        async with running(redis_server.url, prefix, 2) as (a, b):
            held = [await a.acquire("key:r", 3, i) for i in range(3)]
            assert isinstance((await outcome(b.acquire("key:r", 3, 0)))[0], Throttled)
            a.release(held.pop())
            a.release(Hold("key:r", True, 10_000))  # not one of its holds: ignored
            taken: list[Hold] = []
            await until(can_take(b, "key:r", 3, taken), 5.0)  # a's decrement reached Redis
            assert isinstance((await outcome(b.acquire("key:r", 3, 1)))[0], Throttled)

            # the same frontend's next call is never refused by its own unsent release
            a.release(held.pop())
            assert await a.acquire("key:r", 3, 1) is not None

            # twice is once
            a.release(held[0])
            a.release(held[0])
            await until(lambda: drained(a))
            assert in_redis(redis_server.url, prefix, "key:r") == {a.frontend_id: 1, b.frontend_id: 1}
        assert in_redis(redis_server.url, prefix, "key:r") == {}  # closed: counts taken out

    asyncio.run(scenario())


def test_a_cancelled_acquire_leaves_redis_counting_only_the_places_handed_out(redis_server: Any, prefix: str) -> None:
    async def scenario() -> None:
        async with running(redis_server.url, prefix) as [a]:
            held: list[Hold] = []

            async def take() -> None:
                hold = await a.acquire("key:c", 1000, 0)
                assert hold is not None
                held.append(hold)

            for i in range(40):  # cancelled at different points of the round trip (0-8 ms)
                task = asyncio.ensure_future(take())
                await asyncio.sleep(i * 0.0002)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await until(lambda: drained(a))
            assert sum(in_redis(redis_server.url, prefix, "key:c").values()) == len(held)
            assert 0 < len(held) < 40  # some were cancelled before, some after their answer

    asyncio.run(scenario())


# -- a frontend that dies --------------------------------------------------------------------

_HOLDER = """
import asyncio, sys
from splitspace.cpu_frontend.door.inflight_ledger import open_ledger
from splitspace.shared.config.settings import Settings

async def main():
    led = open_ledger(Settings(redis_url=sys.argv[1], lease_s=float(sys.argv[3])), prefix=sys.argv[2])
    await led.start()
    for i in range(4):
        await led.acquire("key:dead", 5, i)
    print("held", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_frontend_killed_mid_request_frees_its_counts_within_the_lease(redis_server: Any, prefix: str) -> None:
    lease_s = 1.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, redis_server.url, prefix, str(lease_s)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )

    async def scenario() -> None:
        async with running(redis_server.url, prefix, lease_s=lease_s) as [b]:
            assert holder.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(None, holder.stdout.readline)
            assert line.strip() == b"held"
            mine = await b.acquire("key:dead", 5, 0)  # b's renewals keep the flow's set alive,
            assert mine is not None  # so only the expiry of the dead frontend's leases can free the rest
            # alive, it renews its lease: its places stay taken well past one lease
            deadline = time.monotonic() + 3 * lease_s
            while time.monotonic() < deadline:
                assert isinstance((await outcome(b.acquire("key:dead", 5, 1)))[0], Throttled)
                await asyncio.sleep(0.1)
            os.kill(holder.pid, signal.SIGKILL)  # no release, no goodbye
            holder.wait()
            taken: list[Hold] = []
            freed_after = await until(can_take(b, "key:dead", 5, taken), 5 * lease_s)
            assert freed_after <= lease_s + 0.5
            for _ in range(3):
                assert await b.acquire("key:dead", 5, 0) is not None  # all four places back
            assert in_redis(redis_server.url, prefix, "key:dead") == {b.frontend_id: 5}  # its leases dropped

    try:
        asyncio.run(scenario())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# -- Redis away ----------------------------------------------------------------------------


def test_closed_mode_refuses_while_redis_is_stopped_and_recovers(own_redis: Any, prefix: str) -> None:
    async def scenario() -> None:
        async with running(own_redis.url, prefix, 2) as (a, peer):
            before = [await a.acquire("key:s", 4, 0), await a.acquire("key:s", 4, 1)]
            own_redis.stop()

            refused, took = await outcome(a.acquire("key:s", 4, 2))
            assert isinstance(refused, ServiceUnavailable) and refused.title == SERVICE_UNAVAILABLE
            assert refused.retry_after_s > 0 and "Retry in" in refused.user_text()
            assert "Redis" in refused.reason and took < CALL_BOUND_S
            again, took = await outcome(a.acquire("key:s", 4, 2))
            assert isinstance(again, ServiceUnavailable) and took < 0.1  # the breaker is open: no wait
            a.release(before.pop())  # a release while Redis is down: no error, no wait

            own_redis.start()  # same port, empty (no persistence)
            taken: list[Hold] = []
            await until(can_take(a, "key:s", 4, taken), RETRY_S + CALL_BOUND_S + 3)
            await until(lambda: drained(a))
            await until(lambda: drained(peer))
            # the hold from before the outage is written back; the released one is not
            assert in_redis(own_redis.url, prefix, "key:s") == {a.frontend_id: 2}
            assert await peer.acquire("key:s", 4, 0) is not None
            assert await peer.acquire("key:s", 4, 1) is not None
            assert isinstance((await outcome(peer.acquire("key:s", 4, 2)))[0], Throttled)

    asyncio.run(scenario())


def test_local_mode_caps_each_frontend_at_its_share_and_counts_nothing_twice(own_redis: Any, prefix: str) -> None:
    assert [local_share(cap, 2) for cap in (0, 1, 2, 4, 5)] == [0, 1, 1, 2, 2]

    async def scenario() -> None:
        async with running(own_redis.url, prefix, mode="local", replicas=2) as [a]:
            before = [await a.acquire("key:l", 4, 0), await a.acquire("key:l", 4, 1)]
            own_redis.stop()

            first, took = await outcome(a.acquire("key:l", 4, 0))
            assert isinstance(first, Hold) and not first.in_redis and took < CALL_BOUND_S
            second, took = await outcome(a.acquire("key:l", 4, 1))
            assert isinstance(second, Hold) and not second.in_redis and took < 0.1
            over, _ = await outcome(a.acquire("key:l", 4, 2))  # 4 // 2 = 2 here
            assert isinstance(over, Throttled) and over.title == QUEUE_FULL
            assert "2 per frontend while the shared store is down" in over.reason
            assert isinstance(await a.acquire("key:solo", 1, 0), Hold)  # at least 1 ...
            assert isinstance((await outcome(a.acquire("key:zero", 0, 0)))[0], Throttled)  # ... unless 0
            a.release(before.pop())  # taken in Redis, released during the outage
            a.release(first)  # taken locally, released during the outage

            own_redis.start()  # empty
            await until(lambda: drained(a), RETRY_S + CALL_BOUND_S + 3)
            assert in_redis(own_redis.url, prefix, "key:l") == {a.frontend_id: 1}  # before[0] only
            a.release(second)  # taken locally, released after: Redis is not touched
            await until(lambda: drained(a))
            assert in_redis(own_redis.url, prefix, "key:l") == {a.frontend_id: 1}
            a.release(before.pop())
            await until(lambda: drained(a))
            assert in_redis(own_redis.url, prefix, "key:l") == {}
            held = [await a.acquire("key:l", 4, i) for i in range(4)]  # Redis' cap again, all of it
            assert all(h is not None and h.in_redis for h in held)
            assert isinstance((await outcome(a.acquire("key:l", 4, 4)))[0], Throttled)

    asyncio.run(scenario())


def test_a_hung_redis_never_hangs_an_acquire_and_counts_are_right_after(own_redis: Any, prefix: str) -> None:
    async def scenario() -> None:
        async with running(own_redis.url, prefix, mode="local", replicas=1) as [a]:
            try:
                before = [await a.acquire("key:h", 4, 0), await a.acquire("key:h", 4, 1)]
                own_redis.pause()
                results = [await outcome(a.acquire("key:h", 4, 2 + i)) for i in range(2)]
                assert all(isinstance(r, Hold) and not r.in_redis for r, _ in results)  # decided locally
                assert max(t for _, t in results) < CALL_BOUND_S
                a.release(before.pop())
                own_redis.resume()
                # a call that timed out may run now that Redis resumes; the repair puts it right
                await until(lambda: drained(a), RETRY_S + CALL_BOUND_S + 3)
                assert in_redis(own_redis.url, prefix, "key:h") == {a.frontend_id: 1}
                for hold, _ in results:
                    a.release(hold)
                await until(lambda: drained(a))
                assert in_redis(own_redis.url, prefix, "key:h") == {a.frontend_id: 1}
            finally:
                own_redis.resume()

    asyncio.run(scenario())


# -- no Redis, and secrets ---------------------------------------------------------------------


def test_without_a_redis_url_the_ledger_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSPACE_REDIS_URL", raising=False)

    async def scenario() -> None:
        led = open_ledger(Settings())
        assert isinstance(led, NullLedger)
        await led.start()
        assert [await led.acquire("key:n", 0, 1000) for _ in range(3)] == [None, None, None]
        led.release(None)
        await led.aclose()

    asyncio.run(scenario())


def test_the_redis_password_is_never_in_an_error_or_a_log(caplog: pytest.LogCaptureFixture, prefix: str) -> None:
    password = "pw-" + uuid.uuid4().hex
    url = f"redis://:{password}@127.0.0.1:{free_port()}/0"  # nothing listens there

    async def scenario() -> None:
        async with running(url, prefix) as [a]:
            refused, took = await outcome(a.acquire("key:p", 4, 0))
            assert isinstance(refused, ServiceUnavailable) and took < CALL_BOUND_S
            assert password not in refused.user_text() and password not in repr(refused)
            assert password not in repr(a)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(scenario())
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    assert password not in caplog.text
