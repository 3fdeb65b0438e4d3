"""Redis taken away and given back, in both failure modes (``SPLITSPACE_REDIS_FAILURE``).

Each test has its own ``redis-server`` and takes it away in one of two ways: stopped
(connections refused; a restart without persistence comes back empty) or paused with
SIGSTOP (connections hang, as with a hung or partitioned Redis; its data is kept).
Every call must return within a bound, the right side must serve, and recovery must be
automatic, without charging twice. The stores are wired as a GPU tier wires them: the
admission on an event loop, the rest on threads, sharing one memory, breaker and list of
unsent releases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from splitspace.gpu_backend.stores.redis_store import RedisStore
from splitspace.gpu_backend.stores.resilient_store import CircuitBreaker, ResilientStore, open_store
from splitspace.gpu_backend.stores.usage import AdmitGrant, AdmitPlan, Lease, Reservation, StoreUnavailable
from splitspace.gpu_backend.stores.write_behind import WriteBehindStore
from splitspace.shared.contract.errors import SERVICE_UNAVAILABLE, ServiceUnavailable
from tests.test_store_contract import LoopThread

RETRY_S = 0.5
"""The breaker's retry interval in these tests (the default is 3 s)."""
CALL_BOUND_S = 1.5
"""Longest any single call may take while Redis is away (two 0.5 s timeouts and slack)."""

pytestmark = pytest.mark.serial  # bounds of a fraction of a second: run alone (scripts/test)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    try:
        result: Any = call()
    except Exception as exc:  # returned, so that the caller asserts on it
        result = exc
    return result, time.monotonic() - start


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


class Tier:
    """A GPU tier's store over one Redis: ``admit`` on an event loop (its own thread
    here), every other call on threads, as a tier makes them."""

    def __init__(self, url: str, prefix: str, mode: str, replicas: int = 2) -> None:
        self.sync = ResilientStore(
            RedisStore.from_url(url, prefix=prefix),
            mode=mode,  # type: ignore[arg-type]
            replicas=replicas,
            breaker=CircuitBreaker(RETRY_S),
        )
        self._loop = LoopThread()

    def admit(self, plan: AdmitPlan) -> AdmitGrant:
        return self._loop.run(self.sync.admit_async(plan))  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sync, name)

    def close(self) -> None:
        self.sync.close()
        self._loop.run(self.sync.aclose())
        self._loop.close()


def resilient(url: str, prefix: str, mode: str, replicas: int = 2) -> Any:
    return Tier(url, prefix, mode, replicas)


def reserving(job: str, amount: float, limit: float = 5.0, key: str = "x", usage_key: str = "c") -> AdmitPlan:
    """A job that reserves ``amount`` of ``usage_key``'s GPU-seconds (its slot: flow ``key``)."""
    reservation = Reservation(usage_key, amount, limit, 100.0)
    return AdmitPlan(key, job, max_queued=100, lease_s=30.0, reservations=(reservation,))


def serves_from_redis(store: Any) -> Callable[[], bool]:
    """A condition: a call goes through and the breaker is closed again."""

    def check() -> bool:
        try:
            store.count("queued", "probe")
        except StoreUnavailable:
            return False
        return not store.breaker.is_open

    return check


# -- the breaker ----------------------------------------------------------------------------


def test_breaker_opens_on_failure_and_lets_one_probe_through_after_the_interval() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(retry_s=3.0, clock=clock)
    assert breaker.allow() and not breaker.is_open
    assert breaker.failed() is True  # an outage began
    assert breaker.failed() is False  # still the same one
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(3.0)
    clock.t += 3.0
    assert breaker.allow() is True  # the probe
    assert breaker.allow() is False  # nobody else meanwhile
    assert breaker.succeeded() is True  # a recovery
    assert breaker.allow() and breaker.retry_after() == 0.0
    with pytest.raises(ValueError, match="retry_s"):
        CircuitBreaker(retry_s=0)


# -- closed: refuse, clearly and quickly ------------------------------------------------------


def test_closed_mode_refuses_while_redis_is_stopped_and_recovers(own_redis: Any, prefix: str) -> None:
    store = resilient(own_redis.url, prefix, "closed")
    peer = RedisStore.from_url(own_redis.url, prefix=prefix)
    try:
        assert store.admit(reserving("before", 1.0, key="c")).granted
        assert store.start_job("c", "before", 1, 30.0, 1.0, "v").granted
        own_redis.stop()

        refused, took = timed(lambda: store.admit(reserving("j", 1.0)))
        assert isinstance(refused, StoreUnavailable) and isinstance(refused, ServiceUnavailable)
        assert refused.title == SERVICE_UNAVAILABLE and refused.retry_after_s > 0
        assert "Retry in" in refused.user_text() and took < CALL_BOUND_S
        for admit in (lambda: store.admit(reserving("j", 1.0)), lambda: store.start_job("c", "j", 1, 30.0, 1.0, "v")):
            refused, took = timed(admit)
            assert isinstance(refused, StoreUnavailable) and took < 0.1  # the breaker is open: no wait
        # settlements and reads never raise; operators are told their change did not land
        store.settle("c", "before", [("c", -0.5)], forget_rate=True)
        assert store.renew([Lease("running", "c", "before")], 30.0).lost
        assert store.usage("c") == (0.0, 0.0) and store.count("running", "c") == 0
        for operator in (lambda: store.set_overrides("key:x", {"max_queued": 1}), lambda: store.reset("c")):
            assert isinstance(timed(operator)[0], StoreUnavailable)

        own_redis.start()  # same port, empty (no persistence)
        assert wait_for(serves_from_redis(store)) < RETRY_S + CALL_BOUND_S + 2
        assert store.admit(reserving("after", 2.0)).granted
        assert peer.usage("c")[0] == pytest.approx(2.0)  # Redis counts it; nothing replayed
    finally:
        store.close()
        peer.close()


def test_closed_mode_with_a_hung_redis_never_hangs_and_keeps_its_data(own_redis: Any, prefix: str) -> None:
    store = resilient(own_redis.url, prefix, "closed")
    try:
        assert store.admit(reserving("before", 1.0)).granted
        own_redis.pause()
        results = []
        for i in range(5):
            results.append(timed(lambda: store.admit(reserving(f"j{i}", 1.0))))  # noqa: B023
        assert all(isinstance(r, StoreUnavailable) for r, _ in results)
        assert max(t for _, t in results) < CALL_BOUND_S
        assert sum(t for _, t in results) < CALL_BOUND_S + 0.5  # only the first waits for a timeout
        own_redis.resume()
        wait_for(serves_from_redis(store))
        assert store.usage("c")[0] == pytest.approx(1.0)  # what was reserved before, once
    finally:
        own_redis.resume()
        store.close()


@pytest.mark.parametrize("mode", ["closed", "local"])
def test_a_settlement_redis_missed_is_released_there_once_it_answers(own_redis: Any, prefix: str, mode: str) -> None:
    """Issue 21, 4: a job whose settle could not reach Redis holds no slot there once Redis
    is back with its data; the release alone is sent (the usage correction is not replayed)."""
    store = resilient(own_redis.url, prefix, mode)
    try:
        assert store.admit(reserving("job", 1.0, key="c")).granted
        assert store.start_job("c", "job", 1, 30.0, 1.0, "__v__").granted
        own_redis.pause()  # hung: its data is kept, as a restart with persistence keeps it
        try:
            store.settle("c", "job", [("c", -0.5)], service_delta=-0.5)  # never raises: counted in memory
            assert len(store.unsent) == 1
            assert store.send_unsent() == 0 and len(store.unsent) == 1  # still away: kept
        finally:
            own_redis.resume()
        peer = RedisStore.from_url(own_redis.url, prefix=prefix)
        try:
            assert peer.count("running", "c") == 1  # the stale lease: what made the next job wait
            assert wait_for(lambda: store.send_unsent() == 1 or not len(store.unsent)) < CALL_BOUND_S + RETRY_S + 1
            assert peer.count("running", "c") == 0 and peer.count("queued", "c") == 0
            assert len(store.unsent) == 0 and store.send_unsent() == 0
            assert peer.usage("c")[0] == pytest.approx(1.0)  # the estimate stays: nothing charged twice
        finally:
            peer.close()
    finally:
        store.close()


def test_unsent_releases_are_bounded_oldest_dropped_first(prefix: str) -> None:
    from tests.support import free_port

    store = ResilientStore(RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix), unsent_limit=3)
    for i in range(5):  # nothing listens there: every release is kept for later
        store.settle("c", f"j{i}")
    assert list(store.unsent) == [("c", "j2"), ("c", "j3"), ("c", "j4")]
    store.close()


# -- local: serve, with each replica's share of every limit ----------------------------------


def test_local_mode_serves_with_limits_divided_by_the_replicas(own_redis: Any, prefix: str) -> None:
    store = resilient(own_redis.url, prefix, "local", replicas=2)
    peer = RedisStore.from_url(own_redis.url, prefix=prefix)
    try:
        assert store.admit(reserving("before", 1.0, 10.0)).granted  # in Redis, before the outage
        own_redis.pause()

        first, took = timed(lambda: store.start_job("c", "a", 3, 30.0, 1.0, "v"))
        assert first.granted and took < CALL_BOUND_S  # decided locally after one timeout
        assert not store.start_job("c", "b", 3, 30.0, 1.0, "v").granted  # 3 // 2 = 1
        assert store.start_job("solo", "a", 1, 30.0, 1.0, "v").granted  # at least 1 ...
        assert not store.start_job("zero", "a", 0, 30.0, 1.0, "v").granted  # ... unless 0
        assert store.admit(reserving("r1", 2.0, 4.0)).granted  # 4.0 / 2
        assert store.admit(reserving("r2", 0.1, 4.0)).refused_by == "quota"
        rates = [store.admit(AdmitPlan("rt", f"j{i}", 100, 30.0, rate_limit=5)).granted for i in range(4)]
        assert rates == [True, True, False, False]  # 5 // 2
        plan = AdmitPlan("p", "a", 3, 30.0, (Reservation("pc", 2.0, 4.0, 100.0),), rate_limit=100)
        assert store.admit(plan).granted  # the whole admission, in memory, with the shares:
        by_queue = store.admit(dataclasses.replace(plan, job_id="b"))
        assert (by_queue.granted, by_queue.refused_by) == (False, "queued")  # max_queued 3 // 2
        store.settle("p", "a", [("pc", -2.0)])
        by_quota = store.admit(
            dataclasses.replace(plan, job_id="c", reservations=(Reservation("pc", 2.5, 4.0, 100.0),))
        )
        assert by_quota.refused_by == "quota"  # gpu_seconds 4.0 / 2
        assert store.overrides_version() < 0  # served from memory: caches re-read
        store.settle("c", "a")
        assert store.fallback.count("running", "c") == 0  # the local lease, given back
        assert store.breaker.is_open

        own_redis.resume()
        wait_for(serves_from_redis(store))
        assert peer.usage("c")[0] == pytest.approx(1.0)  # the outage's 2.0 was not replayed
        assert store.admit(reserving("r3", 3.0, 10.0)).granted
        assert peer.usage("c")[0] == pytest.approx(4.0)
        assert store.start_job("c", "b", 3, 30.0, 1.0, "v").granted  # Redis' limit again
        assert peer.count("running", "c") == 1
    finally:
        own_redis.resume()
        store.close()
        peer.close()


def test_local_mode_survives_a_restart_and_releases_go_to_both(own_redis: Any, prefix: str) -> None:
    store = resilient(own_redis.url, prefix, "local", replicas=1)
    peer = RedisStore.from_url(own_redis.url, prefix=prefix)
    try:
        own_redis.stop()
        assert store.start_job("c", "during", 1, 30.0, 1.0, "v").granted
        assert store.fallback.count("running", "c") == 1
        own_redis.start()
        wait_for(serves_from_redis(store))
        assert store.start_job("c", "after", 1, 30.0, 1.0, "v").granted  # Redis never saw "during"
        store.settle("c", "during")
        assert store.fallback.count("running", "c") == 0  # freed where it was taken
        assert peer.count("running", "c") == 1
        store.settle("c", "after")
        assert peer.count("running", "c") == 0
    finally:
        store.close()
        peer.close()


def test_overrides_are_served_from_a_mirror_while_redis_is_away(own_redis: Any, prefix: str) -> None:
    store = resilient(own_redis.url, prefix, "local")
    try:
        store.set_overrides("key:bench", {"gpu_seconds": 0})
        assert store.all_overrides() == {"key:bench": {"gpu_seconds": 0}}
        version = store.overrides_version()
        assert version > 0
        own_redis.pause()
        assert store.all_overrides() == {"key:bench": {"gpu_seconds": 0}}
        assert store.overrides_version() < 0
        assert isinstance(timed(lambda: store.clear_overrides("key:bench"))[0], StoreUnavailable)
        own_redis.resume()
        wait_for(serves_from_redis(store))
        assert store.overrides_version() == version
        assert store.all_overrides() == {"key:bench": {"gpu_seconds": 0}}  # the failed clear did not land
    finally:
        own_redis.resume()
        store.close()


def test_async_admission_fails_over_and_recovers_in_both_modes(own_redis: Any, prefix: str) -> None:
    async def scenario(mode: str) -> None:
        store = ResilientStore(
            RedisStore.from_url(own_redis.url, prefix=f"{prefix}{mode}:"),
            mode=mode,  # type: ignore[arg-type]
            replicas=2,
            breaker=CircuitBreaker(RETRY_S),
        )
        try:
            assert (await store.admit_async(AdmitPlan("c", "a", 4, 30.0))).granted
            own_redis.pause()
            start = time.monotonic()
            for job in ("b", "c", "d"):
                try:
                    grant = await store.admit_async(AdmitPlan("c", job, 4, 30.0))
                except StoreUnavailable:
                    assert mode == "closed"
                else:  # 4 // 2 = 2 in memory, which never saw "a"
                    assert mode == "local" and grant.granted is (job != "d")
            assert time.monotonic() - start < CALL_BOUND_S
            plan = AdmitPlan("d", "x", 4, 30.0, (Reservation("d", 1.0, 1.0, 100.0),))
            try:
                got = await store.admit_async(plan)
            except StoreUnavailable:
                assert mode == "closed"
            else:
                assert mode == "local" and got.refused_by == "quota"  # gpu_seconds 1.0 / 2 refuses 1.0
            own_redis.resume()
            deadline = time.monotonic() + 10
            while True:
                try:
                    if (await store.admit_async(AdmitPlan("c", "a", 4, 30.0))).granted and not store.breaker.is_open:
                        break
                except StoreUnavailable:
                    pass
                assert time.monotonic() < deadline, "no recovery"
                await asyncio.sleep(0.05)
        finally:
            own_redis.resume()
            await store.aclose()
            store.close()

    for mode in ("closed", "local"):
        asyncio.run(scenario(mode))


# -- bounds and messages -----------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a black-holed Redis)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=2)
    for conn in held:
        conn.close()
    server.close()


def test_a_redis_that_never_answers_costs_one_timeout_not_a_hang(silent_port: int, prefix: str) -> None:
    bare = RedisStore.from_url(f"redis://127.0.0.1:{silent_port}/0", prefix=prefix)
    error, took = timed(lambda: bare.count("queued", "c"))
    assert isinstance(error, StoreUnavailable) and took < CALL_BOUND_S
    bare.close()


def test_the_redis_password_is_never_in_an_error(tmp_path: Path, prefix: str) -> None:
    from tests.support import free_port

    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    bare = RedisStore.from_url(url, prefix=prefix)
    store = ResilientStore(bare, mode="closed")
    for call in (lambda: bare.count("queued", "c"), lambda: store.start_job("c", "j", 1, 30.0, 1.0, "v")):
        error = timed(call)[0]
        assert isinstance(error, StoreUnavailable)
        assert "hunter2" not in error.user_text() and "hunter2" not in repr(error)
    store.close()


def test_open_store_keeps_sqlite_without_a_redis_url(tmp_path: Path, redis_server: Any) -> None:
    default = open_store(redis_url=None, sqlite_path=tmp_path / "state.sqlite3")
    assert isinstance(default, WriteBehindStore)
    default.close()
    shared = open_store(
        redis_url=redis_server.url, sqlite_path=tmp_path / "unused.sqlite3", failure="local", replicas=3
    )
    assert isinstance(shared, ResilientStore) and shared.mode == "local"
    assert shared.usage(f"open-store:{uuid.uuid4().hex}") == (0.0, 0.0) and not shared.breaker.is_open
    assert not (tmp_path / "unused.sqlite3").exists()
    shared.close()
    with pytest.raises(ValueError, match="mode"):
        ResilientStore(default, mode="open")  # type: ignore[arg-type]


def test_settings_read_the_redis_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from splitspace.shared.config.settings import Settings

    monkeypatch.setenv("SPLITSPACE_REDIS_URL", "redis://:pw-in-url@example:6379/0")
    monkeypatch.setenv("SPLITSPACE_REDIS_FAILURE", "local")
    monkeypatch.setenv("SPLITSPACE_REPLICAS", "3")
    settings = Settings()
    assert settings.redis_url is not None and settings.redis_url.get_secret_value().endswith("@example:6379/0")
    assert "pw-in-url" not in repr(settings)
    assert (settings.redis_failure, settings.replicas) == ("local", 3)
    monkeypatch.setenv("SPLITSPACE_REDIS_URL", "")
    monkeypatch.delenv("SPLITSPACE_REDIS_FAILURE")
    monkeypatch.delenv("SPLITSPACE_REPLICAS")
    assert (Settings().redis_url, Settings().redis_failure, Settings().replicas) == (None, "closed", 1)
    monkeypatch.setenv("SPLITSPACE_REDIS_FAILURE", "open")
    with pytest.raises(ValidationError, match="redis_failure"):
        Settings()
