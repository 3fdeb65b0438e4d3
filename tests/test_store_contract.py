"""One contract, four stores: memory, SQLite, Redis (blocking) and Redis (asyncio).

Every store the tiers can use keeps the same promises: atomic check-and-change under
races, leases that expire by themselves, sliding rate windows, shared fair service.
The suite runs in real time (the Redis store reads Redis' clock, not ours), so windows
and leases are short and every wait is a poll for the condition, bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from splitspace.gpu_backend.stores.redis_store import AsyncRedisStore, RedisStore
from splitspace.gpu_backend.stores.usage import (
    AdmitPlan,
    Lease,
    MemoryUsageStore,
    Reservation,
    SlotCounts,
    SqliteUsageStore,
    UsageStore,
)

KINDS = ["memory", "sqlite", "redis", "redis-async"]


class LoopThread:
    """An event loop on its own thread, so that sync tests can drive the async store."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class SyncView:
    """The async store's coroutines called as plain methods, through a loop thread."""

    def __init__(self, store: AsyncRedisStore, loop: LoopThread) -> None:
        self._store, self._loop = store, loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._store, name)
        return lambda *args, **kwargs: self._loop.run(method(*args, **kwargs))


Factory = Callable[..., Any]


@pytest.fixture(params=KINDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Handles on one store's state: each call opens another (its own connection), as
    another replica would; the memory store can only be shared as one object."""
    kind = request.param
    opened: list[Any] = []
    loop: LoopThread | None = None
    prefix = f"test:{uuid.uuid4().hex}:"
    shared_memory: dict[float, MemoryUsageStore] = {}

    def make(service_ttl_s: float = 86400.0) -> Any:
        nonlocal loop
        if kind == "memory":
            return shared_memory.setdefault(service_ttl_s, MemoryUsageStore(service_ttl_s=service_ttl_s))
        if kind == "sqlite":
            store: Any = SqliteUsageStore(tmp_path / "state.sqlite3", service_ttl_s=service_ttl_s)
        elif kind == "redis":
            server = request.getfixturevalue("redis_server")
            store = RedisStore.from_url(server.url, prefix=prefix, service_ttl_s=service_ttl_s)
        else:
            server = request.getfixturevalue("redis_server")
            loop = loop or LoopThread()
            store = SyncView(
                loop.run(_async_store(server.url, prefix, service_ttl_s)), loop
            )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
    if loop is not None:
        loop.close()


async def _async_store(url: str, prefix: str, ttl: float) -> AsyncRedisStore:
    return AsyncRedisStore.from_url(url, prefix=prefix, service_ttl_s=ttl)


@pytest.fixture
def store(make_store: Factory) -> UsageStore:
    return make_store()


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0, every_s: float = 0.02) -> float:
    """Poll until ``condition()``; the seconds it took. Fails after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - start


# -- usage windows ------------------------------------------------------------------------


def test_reserve_within_limit(store: UsageStore) -> None:
    assert store.reserve("k", 1.0, 3.0, 100.0) is None
    assert store.reserve("k", 2.0, 3.0, 100.0) is None
    used, resets_in = store.usage("k")
    assert used == pytest.approx(3.0) and 95.0 < resets_in <= 100.0


def test_reserve_over_limit_says_when_the_window_resets(store: UsageStore) -> None:
    assert store.reserve("k", 2.0, 3.0, 100.0) is None
    retry = store.reserve("k", 2.0, 3.0, 100.0)
    assert retry is not None and 95.0 < retry <= 100.0
    assert store.usage("k")[0] == pytest.approx(2.0)  # a refusal adds nothing
    assert store.reserve("k", 5.0, 3.0, 100.0) is not None  # more than the whole limit


def test_float_sums_fit_their_limit_and_infinite_limits(store: UsageStore) -> None:
    for _ in range(3):
        assert store.reserve("k", 0.1, 0.3, 100.0) is None
    assert store.reserve("k", 0.1, 0.3, 100.0) is not None
    assert store.reserve("big", 1e9, math.inf, 100.0) is None
    assert store.usage("big")[0] == pytest.approx(1e9)


def test_bad_input_is_refused_naming_it(store: UsageStore) -> None:
    with pytest.raises(ValueError, match="amount"):
        store.reserve("k", -1.0, 3.0, 100.0)
    with pytest.raises(ValueError, match="window_s"):
        store.reserve("k", 1.0, 3.0, 0.0)
    with pytest.raises(ValueError, match="kind"):
        store.acquire_slot("waiting", "k", "j", 1, 10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease_s"):
        store.acquire_slot("queued", "k", "j", 1, 0.0)
    with pytest.raises(ValueError, match="window_s"):
        store.admit_rate("k", "j", 1, -1.0)
    with pytest.raises(ValueError, match="delta"):
        store.add_service("f", math.nan)


def test_window_expires_and_restarts_at_first_use(store: UsageStore) -> None:
    assert store.reserve("k", 3.0, 3.0, 0.4) is None
    assert store.reserve("k", 1.0, 3.0, 0.4) is not None
    waited = wait_for(lambda: store.usage("k") == (0.0, 0.0))
    assert waited < 3.0
    assert store.reserve("k", 3.0, 3.0, 100.0) is None  # a new window, of the new length
    used, resets_in = store.usage("k")
    assert used == pytest.approx(3.0) and resets_in > 95.0


def test_window_length_is_the_one_that_opened_it(store: UsageStore) -> None:
    assert store.reserve("k", 1.0, 3.0, 100.0) is None
    assert store.reserve("k", 1.0, 3.0, 10.0) is None
    used, resets_in = store.usage("k")
    assert used == pytest.approx(2.0) and resets_in > 90.0


def test_keys_are_independent(store: UsageStore) -> None:
    assert store.reserve("a", 3.0, 3.0, 100.0) is None
    assert store.reserve("b", 3.0, 3.0, 100.0) is None
    assert store.usage("c") == (0.0, 0.0)


def test_adjust_settles_clamps_and_ignores_dead_windows(store: UsageStore) -> None:
    store.reserve("k", 1.0, 3.0, 100.0)
    store.adjust("k", 0.1 - 1.0)  # estimated 1.0, measured 0.1
    assert store.usage("k")[0] == pytest.approx(0.1)
    store.adjust("k", 0.5)
    assert store.usage("k")[0] == pytest.approx(0.6)
    store.adjust("k", -5.0)
    assert store.usage("k")[0] == 0.0
    store.adjust("nobody", 2.0)
    assert store.usage("nobody") == (0.0, 0.0)
    store.reserve("short", 1.0, 3.0, 0.3)
    wait_for(lambda: store.usage("short") == (0.0, 0.0))
    store.adjust("short", 2.0)
    assert store.usage("short") == (0.0, 0.0)


def test_usage_keys_list_live_windows_whoever_spent_them(make_store: Factory) -> None:
    a, b = make_store(), make_store()
    assert a.usage_keys() == []
    assert a.reserve("key:alpha", 1.0, 10.0, 100.0) is None
    assert b.reserve("address:1.2.3.4", 1.0, 10.0, 100.0) is None  # another replica
    assert b.admit(AdmitPlan(key="f", job_id="j", max_queued=1, lease_s=30.0,
                             reservations=(Reservation("session:s1", 0.5, 10.0, 100.0),))).granted
    assert b.reserve("key:short", 1.0, 10.0, 0.3) is None
    assert b.reserve("key:refused", 5.0, 1.0, 100.0) is not None  # a refusal opens no window
    assert a.usage_keys() == ["address:1.2.3.4", "key:alpha", "key:short", "session:s1"]
    wait_for(lambda: "key:short" not in a.usage_keys())  # an expired window leaves the list
    a.reset("key:alpha")
    assert b.usage_keys() == ["address:1.2.3.4", "session:s1"]


def test_reset(store: UsageStore) -> None:
    store.reserve("k", 3.0, 3.0, 100.0)
    store.reset("k")
    assert store.usage("k") == (0.0, 0.0)
    assert store.reserve("k", 3.0, 3.0, 100.0) is None


# -- overrides ----------------------------------------------------------------------------


def test_overrides_merge_clear_and_version(store: UsageStore) -> None:
    versions = [store.overrides_version()]
    assert store.get_overrides("key:bench") == {}
    store.set_overrides("key:bench", {"max_queued": 100})
    store.set_overrides("key:bench", {"weight": 2.5, "tier": "pro"})
    store.set_overrides("key:bench", {"max_queued": 7})
    store.set_overrides("session:x", {"gpu_seconds": 0.1})
    versions.append(store.overrides_version())
    assert store.get_overrides("key:bench") == {"max_queued": 7, "weight": 2.5, "tier": "pro"}
    assert store.all_overrides() == {
        "key:bench": {"max_queued": 7, "weight": 2.5, "tier": "pro"},
        "session:x": {"gpu_seconds": 0.1},
    }
    got = store.get_overrides("key:bench")
    got["weight"] = 99  # a copy: the store is not changed behind its back
    assert store.get_overrides("key:bench")["weight"] == 2.5
    store.clear_overrides("key:bench")
    versions.append(store.overrides_version())
    assert store.get_overrides("key:bench") == {}
    assert list(store.all_overrides()) == ["session:x"]
    assert versions == sorted(set(versions)), versions  # every change moved it


def test_an_override_set_through_one_handle_is_seen_through_another(make_store: Factory) -> None:
    one, two = make_store(), make_store()
    before = two.overrides_version()
    one.set_overrides("key:a", {"gpu_seconds": 0})
    assert two.overrides_version() != before
    assert two.get_overrides("key:a") == {"gpu_seconds": 0}


# -- slots --------------------------------------------------------------------------------


def test_slots_up_to_the_limit_then_refused_with_the_count(store: UsageStore) -> None:
    grants = [store.acquire_slot("queued", "f", f"j{i}", 3, 30.0) for i in range(5)]
    assert [g.granted for g in grants] == [True, True, True, False, False]
    assert [g.held for g in grants] == [1, 2, 3, 3, 3]
    assert store.count("queued", "f") == 3
    again = store.acquire_slot("queued", "f", "j0", 3, 30.0)  # a retry of a holder
    assert again.granted and again.held == 3
    assert store.count("running", "f") == 0 and store.count("queued", "g") == 0


def test_release_frees_a_slot_once(store: UsageStore) -> None:
    store.acquire_slot("running", "f", "a", 1, 30.0)
    assert not store.acquire_slot("running", "f", "b", 1, 30.0).granted
    assert store.release("running", "f", "a") is True
    assert store.release("running", "f", "a") is False
    assert store.release("queued", "f", "b") is False
    assert store.acquire_slot("running", "f", "b", 1, 30.0).granted


def test_limit_zero_and_infinite(store: UsageStore) -> None:
    assert not store.acquire_slot("queued", "f", "a", 0, 30.0).granted
    assert all(store.acquire_slot("queued", "g", f"j{i}", math.inf, 30.0).granted for i in range(20))
    assert store.count("queued", "g") == 20


def test_a_lease_nobody_renews_expires_by_itself(store: UsageStore) -> None:
    assert store.acquire_slot("running", "f", "crashed", 1, 0.4).granted
    assert store.count("running", "f") == 1
    assert not store.acquire_slot("running", "f", "next", 1, 30.0).granted
    waited = wait_for(lambda: store.acquire_slot("running", "f", "next", 1, 30.0).granted)
    assert waited < 3.0
    assert store.count("running", "f") == 1  # only "next"
    assert store.renew([Lease("running", "f", "crashed")], 30.0).lost == (Lease("running", "f", "crashed"),)


def test_renewed_leases_outlive_their_first_expiry(store: UsageStore) -> None:
    held = [Lease("running", "f", "a"), Lease("queued", "f", "b")]
    for lease in held:
        assert store.acquire_slot(lease.kind, lease.key, lease.job_id, 5, 0.5).granted
    start = time.monotonic()
    while time.monotonic() - start < 1.2:  # a renewer beating at lease / 5, for over two leases
        renewal = store.renew(held, 0.5)
        assert renewal.renewed == tuple(held) and renewal.lost == ()
        time.sleep(0.1)
    assert store.count("running", "f") == 1 and store.count("queued", "f") == 1
    wait_for(lambda: store.count("running", "f") == 0 and store.count("queued", "f") == 0)


def test_renew_reports_released_and_unknown_leases_as_lost(store: UsageStore) -> None:
    store.acquire_slot("queued", "f", "a", 5, 30.0)
    store.acquire_slot("queued", "f", "b", 5, 30.0)
    store.release("queued", "f", "b")
    renewal = store.renew([Lease("queued", "f", "a"), Lease("queued", "f", "b"), Lease("running", "x", "c")], 30.0)
    assert renewal.renewed == (Lease("queued", "f", "a"),)
    assert renewal.lost == (Lease("queued", "f", "b"), Lease("running", "x", "c"))
    assert store.renew([], 30.0).renewed == ()


def test_move_dispatches_within_the_running_limit(store: UsageStore) -> None:
    for job in ("a", "b"):
        store.acquire_slot("queued", "f", job, 4, 30.0)
    first = store.move("f", "a", 1, 30.0)
    assert first.granted and first.held == 1
    assert store.count("queued", "f") == 1 and store.count("running", "f") == 1
    refused = store.move("f", "b", 1, 30.0)
    assert not refused.granted and refused.held == 1
    assert store.count("queued", "f") == 1  # b keeps its queued slot
    assert store.move("f", "a", 1, 30.0).granted  # a retry of the same dispatch
    store.release("running", "f", "a")
    assert store.move("f", "b", 1, 30.0).granted
    assert store.count("queued", "f") == 0
    assert store.move("f", "lost-its-queued-lease", 2, 30.0).granted  # admitted all the same
    assert store.count("running", "f") == 2


# -- rate windows -------------------------------------------------------------------------


def test_rate_window_admits_up_to_the_limit_and_says_when(store: UsageStore) -> None:
    grants = [store.admit_rate("f", f"j{i}", 3, 60.0) for i in range(4)]
    assert [g.granted for g in grants] == [True, True, True, False]
    assert grants[2].held == 3 and grants[3].held == 3
    assert 55.0 < grants[3].retry_after_s <= 60.0
    assert store.admit_rate("f", "j1", 3, 60.0).granted  # the same request counted once
    store.forget_rate("f", "j2")
    assert store.admit_rate("f", "j9", 3, 60.0).granted
    assert not store.admit_rate("zero", "j", 0, 60.0).granted


def test_rate_window_slides(store: UsageStore) -> None:
    assert store.admit_rate("f", "a", 2, 0.5).granted
    assert store.admit_rate("f", "b", 2, 0.5).granted
    refused = store.admit_rate("f", "c", 2, 0.5)
    assert not refused.granted and 0.0 < refused.retry_after_s <= 0.5
    waited = wait_for(lambda: store.admit_rate("f", "c", 2, 0.5).granted)
    assert waited < 3.0


# -- service ------------------------------------------------------------------------------


def test_service_adds_with_a_floor_and_is_shared(make_store: Factory) -> None:
    a, b = make_store(), make_store()
    assert a.service(["f", "g"]) == {}
    assert a.add_service("f", 1.5) == pytest.approx(1.5)
    assert b.add_service("f", 0.25) == pytest.approx(1.75)  # served on A, not fresh on B
    assert b.add_service("g", 1.0, floor=10.0) == pytest.approx(11.0)  # idle: starts at V
    assert a.add_service("g", 0.0, floor=5.0) == pytest.approx(11.0)  # a floor below is no change
    assert a.add_service("v", 0.0, floor=3.0) == pytest.approx(3.0)  # a shared maximum
    assert a.add_service("v", 0.0, floor=2.0) == pytest.approx(3.0)
    assert a.add_service("f", -0.5) == pytest.approx(1.25)  # a correction
    got = b.service(["f", "g", "unknown", "f"])
    assert got == {"f": pytest.approx(1.25), "g": pytest.approx(11.0)}
    assert b.service([]) == {}


def test_service_of_an_idle_flow_is_forgotten(make_store: Factory) -> None:
    store = make_store(service_ttl_s=0.3)
    store.add_service("f", 2.0)
    assert "f" in store.service(["f"])
    wait_for(lambda: store.service(["f"]) == {})
    assert store.add_service("f", 1.0) == pytest.approx(1.0)


# -- a job's steps in one call: admit, start_job, settle --------------------------------


def _plan(job: str, *, queued: float = 2, rate: float | None = 3, quota: float = 1.0, address: float | None = 5.0,
          window_s: float = 100.0) -> AdmitPlan:
    reservations = [Reservation("c", 0.5, quota, window_s)]
    if address is not None:
        reservations.append(Reservation("addr-usage:1.2.3.4", 0.5, address, window_s))
    return AdmitPlan(key="f", job_id=job, max_queued=queued, lease_s=30.0, reservations=tuple(reservations),
                     rate_limit=rate, rate_window_s=60.0, service=("f", "__v__"))


def test_admit_takes_every_check_or_none(store: UsageStore) -> None:
    store.add_service("f", 2.0)
    first = store.admit(_plan("a"))
    assert first.granted and first.service == {"f": pytest.approx(2.0)}  # an unknown counter is left out
    assert store.count("queued", "f") == 1 and store.usage("c")[0] == pytest.approx(0.5)
    assert store.usage("addr-usage:1.2.3.4")[0] == pytest.approx(0.5)

    by_quota = store.admit(_plan("b", quota=0.75))  # the client's quota refuses: 0.5 + 0.5 > 0.75
    assert (by_quota.granted, by_quota.refused_by, by_quota.quota) == (False, "quota", 0)
    assert by_quota.used == pytest.approx(0.5) and 95.0 < by_quota.retry_after_s <= 100.0
    by_address = store.admit(_plan("b", address=0.75))  # the address' ceiling refuses
    assert (by_address.refused_by, by_address.quota) == ("quota", 1)
    for refused in (by_quota, by_address):  # nothing of either is left taken
        assert refused.service == {}
    assert store.count("queued", "f") == 1 and store.usage("c")[0] == pytest.approx(0.5)
    assert store.usage("addr-usage:1.2.3.4")[0] == pytest.approx(0.5)
    assert store.admit_rate("f", "probe", 2, 60.0).granted  # only "a" is in the rate window
    store.forget_rate("f", "probe")

    assert store.admit(_plan("b")).granted
    full = store.admit(_plan("c"))
    assert (full.refused_by, full.held) == ("queued", 2)
    rated = store.admit(_plan("d", queued=10, rate=2))
    assert (rated.refused_by, rated.held) == ("rate", 2) and 55.0 < rated.retry_after_s <= 60.0
    assert store.count("queued", "f") == 2 and store.usage("c")[0] == pytest.approx(1.0)
    bare = store.admit(AdmitPlan(key="g", job_id="x", max_queued=1, lease_s=30.0))  # no rate, no quota
    assert bare.granted and bare.service == {} and store.count("queued", "g") == 1
    assert not store.admit(AdmitPlan(key="g", job_id="y", max_queued=1, lease_s=30.0)).granted


def test_settle_gives_back_both_leases_and_corrects_the_usage(store: UsageStore) -> None:
    assert store.admit(_plan("a")).granted
    assert store.admit(_plan("b")).granted
    assert store.move("f", "a", 1, 30.0).granted
    store.settle("f", "a", [("c", -0.2), ("addr-usage:1.2.3.4", 0.1)])
    assert store.count("running", "f") == 0 and store.count("queued", "f") == 1
    assert store.usage("c")[0] == pytest.approx(0.8)
    assert store.usage("addr-usage:1.2.3.4")[0] == pytest.approx(1.1)
    store.settle("f", "b", [("c", -0.5), ("gone", 1.0)], forget_rate=True)  # a queued job that left
    assert store.count("queued", "f") == 0 and store.usage("c")[0] == pytest.approx(0.3)
    assert store.usage("gone") == (0.0, 0.0)  # a dead window is not brought back
    grants = [store.admit_rate("f", f"n{i}", 3, 60.0).granted for i in range(3)]
    assert grants == [True, True, False]  # "b" left the rate window, "a" did not
    store.settle("f", "a", [])  # settling twice changes nothing
    assert store.usage("c")[0] == pytest.approx(0.3)


def test_start_job_dispatches_and_charges_the_flow_and_the_virtual_time(make_store: Factory) -> None:
    a, b = make_store(), make_store()
    for job in ("j1", "j2", "j3"):
        assert a.admit(AdmitPlan(key="f", job_id=job, max_queued=5, lease_s=30.0)).granted
    first = a.start_job("f", "j1", 1, 30.0, 1.0, "__v__")
    assert first.granted and first.held == 1  # S_f = max(0, V = 0) + 1, V = 0
    refused = b.start_job("f", "j2", 1, 30.0, 1.0, "__v__")  # max_running 1, across handles
    assert not refused.granted and refused.held == 1
    assert b.service(["f", "__v__"]) == {"f": pytest.approx(1.0), "__v__": pytest.approx(0.0)}  # refused: no charge
    assert b.count("queued", "f") == 2 and b.count("running", "f") == 1
    b.settle("f", "j1", [], service_delta=-0.25)  # it ran for less than its estimate
    assert b.start_job("f", "j2", 1, 30.0, 1.0, "__v__").granted  # served on A, not fresh on B
    assert a.service(["f", "__v__"]) == {"f": pytest.approx(1.75), "__v__": pytest.approx(0.75)}
    assert a.admit(AdmitPlan(key="g", job_id="x", max_queued=1, lease_s=30.0)).granted
    assert a.start_job("g", "x", 1, 30.0, 0.5, "__v__").held == 1  # a new flow starts at V
    assert b.service(["g"]) == {"g": pytest.approx(1.25)}
    assert b.service(["__v__"]) == {"__v__": pytest.approx(0.75)}  # V is a maximum: g's start tag is V


# -- races: at most the limit, whoever asks ---------------------------------------------------


def _race(make_store: Factory, workers: int, attempt: Callable[[Any, int], bool]) -> int:
    """``workers`` handles (as many replicas) released at once; how many attempts won."""
    handles = [make_store() for _ in range(workers)]
    barrier = threading.Barrier(workers)

    def run(i: int) -> int:
        barrier.wait()
        return sum(attempt(handles[i], i * 100 + n) for n in range(5))

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(run, range(workers)))


def test_racing_slot_takers_never_exceed_the_limit(make_store: Factory) -> None:
    won = _race(make_store, 8, lambda s, n: s.acquire_slot("queued", "hot", f"j{n}", 3, 30.0).granted)
    assert won == 3
    assert make_store().count("queued", "hot") == 3


def test_racing_dispatchers_never_exceed_max_running(make_store: Factory) -> None:
    seed = make_store()
    for n in range(40):
        seed.acquire_slot("queued", "hot", f"j{n}", 100, 30.0)
    won = _race(make_store, 8, lambda s, n: s.move("hot", f"j{n % 40}", 2, 30.0).granted)
    assert seed.count("running", "hot") == 2
    assert won >= 2  # a retry of a granted move is granted again, never a third job
    assert seed.count("queued", "hot") == 38


def test_racing_reservations_never_exceed_the_quota(make_store: Factory) -> None:
    won = _race(make_store, 8, lambda s, n: s.reserve("hot", 0.5, 5.0, 100.0) is None)
    assert won == 10
    assert make_store().usage("hot")[0] == pytest.approx(5.0)


def test_racing_requests_never_exceed_the_rate(make_store: Factory) -> None:
    won = _race(make_store, 8, lambda s, n: s.admit_rate("hot", f"j{n}", 7, 60.0).granted)
    assert won == 7


def test_racing_admissions_never_exceed_the_queue_or_the_quota(make_store: Factory) -> None:
    def admit(s: Any, n: int, queued: float, quota: float) -> bool:
        plan = AdmitPlan(key="hot", job_id=f"j{n}", max_queued=queued, lease_s=30.0,
                         reservations=(Reservation(f"q{queued}", 0.5, quota, 100.0),), rate_limit=7, rate_window_s=60.0)
        return bool(s.admit(plan).granted)

    assert _race(make_store, 8, lambda s, n: admit(s, n, 3, math.inf)) == 3
    assert _race(make_store, 8, lambda s, n: admit(s, 1000 + n, 1000, 1.5)) == 3  # the quota: 3 x 0.5
    assert make_store().usage("q1000")[0] == pytest.approx(1.5)  # refusals left nothing reserved
    assert make_store().count("queued", "hot") == 6


# -- Redis only: its clock, not ours ------------------------------------------------------------


def test_redis_reads_its_own_clock_not_the_callers(redis_server: Any) -> None:
    store = RedisStore.from_url(redis_server.url, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        assert store.reserve("k", 1.0, 3.0, 100.0, now=0.0) is None  # a replica whose clock says 1970
        used, resets_in = store.usage("k", now=1e12)  # and one far in the future
        assert used == 1.0 and 95.0 < resets_in <= 100.0
        assert store.acquire_slot("running", "f", "a", 1, 30.0, now=1e12).granted
        assert store.count("running", "f", now=0.0) == 1
    finally:
        store.close()


def test_redis_admits_a_nonce_once_across_handles(redis_server: Any) -> None:
    """Issue 21, 5: an identity token's nonce is admitted once on every tier sharing Redis."""
    prefix = f"test:{uuid.uuid4().hex}:"
    a, b = (RedisStore.from_url(redis_server.url, prefix=prefix) for _ in range(2))
    try:
        with_nonce = lambda job, **kw: dataclasses.replace(_plan(job, **kw), nonce="n1", nonce_ttl_s=120.0)  # noqa: E731
        assert a.admit(with_nonce("a")).granted
        assert a.admit(with_nonce("a")).granted  # the same call sent again (a reconnect): no replay
        before = b.usage("c")[0]
        replay = b.admit(with_nonce("b"))
        assert (replay.granted, replay.refused_by) == (False, "replay")
        assert b.count("queued", "f") == 1 and b.usage("c")[0] == before  # nothing taken
        refused = b.admit(dataclasses.replace(_plan("c", quota=0.75), nonce="n2"))  # refused by the quota...
        assert refused.refused_by == "quota"
        assert a.admit(dataclasses.replace(_plan("d"), nonce="n2")).refused_by == "replay"  # ...its nonce used
        assert a.admit(_plan("e", quota=10)).granted  # no nonce: no check
    finally:
        a.close()
        b.close()


def test_slot_counts_list_every_holder_across_handles(make_store: Factory) -> None:
    a, b = make_store(), make_store()
    assert a.slot_counts() == {}
    a.acquire_slot("queued", "key:alpha", "j1", 5, 30.0)
    b.acquire_slot("queued", "key:alpha", "j2", 5, 30.0)  # the same client on another replica
    b.move("key:alpha", "j2", 1, 30.0)
    b.acquire_slot("running", "addr:10.0.0.1", "j3", 1, 0.3)
    b.acquire_slot("queued", "key:gone", "j4", 5, 30.0)
    b.release("queued", "key:gone", "j4")
    counts = a.slot_counts()
    assert counts == {"key:alpha": SlotCounts(queued=1, running=1), "addr:10.0.0.1": SlotCounts(running=1)}
    wait_for(lambda: "addr:10.0.0.1" not in a.slot_counts())  # its lease ran out
    assert b.slot_counts() == {"key:alpha": SlotCounts(queued=1, running=1)}
