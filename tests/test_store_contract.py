"""One contract, three faces: memory, Redis (blocking) and Redis with admission on asyncio.

Every shared store keeps the same promises, through the calls a GPU tier makes (a job's
``admit``, ``start_job`` and ``settle``, the lease renewal, the operators' reads and
overrides): atomic check-and-change under races, leases that expire by themselves,
sliding rate windows, shared fair service. The suite runs in real time (the Redis store
reads Redis' clock, not ours), so windows and leases are short and every wait is a poll
for the condition, bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from splitspace.gpu_backend.stores.redis_store import RedisStore
from splitspace.gpu_backend.stores.usage import (
    AdmitGrant,
    AdmitPlan,
    Lease,
    MemoryUsageStore,
    Reservation,
    SlotCounts,
    UsageStore,
)

KINDS = ["memory", "redis", "redis-async"]


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


class AsyncAdmission:
    """The store with ``admit`` sent through the event loop's client, as a tier does."""

    def __init__(self, store: RedisStore, loop: LoopThread) -> None:
        self._store, self._loop = store, loop

    def admit(self, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
        return self._loop.run(self._store.admit_async(plan, now))  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def close(self) -> None:
        self._store.close()
        self._loop.run(self._store.aclose())


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
        url = request.getfixturevalue("redis_server").url
        store: Any = RedisStore.from_url(url, prefix=prefix, service_ttl_s=service_ttl_s)
        if kind == "redis-async":
            loop = loop or LoopThread()
            store = AsyncAdmission(store, loop)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
    if loop is not None:
        loop.close()


@pytest.fixture
def store(make_store: Factory) -> UsageStore:
    return make_store()  # type: ignore[no-any-return]


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0, every_s: float = 0.02) -> float:
    """Poll until ``condition()``; the seconds it took. Fails after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - start


def plan(
    job: str,
    key: str = "f",
    *,
    queued: float = math.inf,
    lease_s: float = 30.0,
    rate: float | None = None,
    rate_window_s: float = 60.0,
    reserve: Iterable[tuple[str, float, float, float]] = (),
    service: tuple[str, ...] = (),
) -> AdmitPlan:
    return AdmitPlan(
        key=key,
        job_id=job,
        max_queued=queued,
        lease_s=lease_s,
        rate_limit=rate,
        rate_window_s=rate_window_s,
        reservations=tuple(Reservation(*r) for r in reserve),
        service=service,
    )


def reserve(store: UsageStore, key: str, amount: float, limit: float, window_s: float) -> AdmitGrant:
    """A reservation alone, as its own job (no queue limit to meet)."""
    return store.admit(plan(uuid.uuid4().hex, "r", reserve=[(key, amount, limit, window_s)]))


def service_of(store: UsageStore, flows: Iterable[str]) -> dict[str, float]:
    """The shared service counters, as an admission reads them (a probe job of its own)."""
    return store.admit(plan(uuid.uuid4().hex, "probe", service=tuple(flows))).service


# -- usage windows ------------------------------------------------------------------------


def test_reserve_within_limit(store: UsageStore) -> None:
    assert reserve(store, "k", 1.0, 3.0, 100.0).granted
    assert reserve(store, "k", 2.0, 3.0, 100.0).granted
    used, resets_in = store.usage("k")
    assert used == pytest.approx(3.0) and 95.0 < resets_in <= 100.0


def test_reserve_over_limit_says_when_the_window_resets(store: UsageStore) -> None:
    assert reserve(store, "k", 2.0, 3.0, 100.0).granted
    refused = reserve(store, "k", 2.0, 3.0, 100.0)
    assert (refused.granted, refused.refused_by, refused.quota) == (False, "quota", 0)
    assert 95.0 < refused.retry_after_s <= 100.0 and refused.used == pytest.approx(2.0)
    assert store.usage("k")[0] == pytest.approx(2.0)  # a refusal adds nothing
    assert not reserve(store, "k", 5.0, 3.0, 100.0).granted  # more than the whole limit


def test_float_sums_fit_their_limit_and_infinite_limits(store: UsageStore) -> None:
    for _ in range(3):
        assert reserve(store, "k", 0.1, 0.3, 100.0).granted
    assert not reserve(store, "k", 0.1, 0.3, 100.0).granted
    assert reserve(store, "big", 1e9, math.inf, 100.0).granted
    assert store.usage("big")[0] == pytest.approx(1e9)


def test_bad_input_is_refused_naming_it(store: UsageStore) -> None:
    with pytest.raises(ValueError, match="amount"):
        reserve(store, "k", -1.0, 3.0, 100.0)
    with pytest.raises(ValueError, match="window_s"):
        reserve(store, "k", 1.0, 3.0, 0.0)
    with pytest.raises(ValueError, match="kind"):
        store.count("waiting", "k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease_s"):
        store.admit(plan("j", lease_s=0.0))
    with pytest.raises(ValueError, match="window_s"):
        store.admit(plan("j", rate=1, rate_window_s=-1.0))
    with pytest.raises(ValueError, match="delta"):
        store.start_job("f", "j", 1, 30.0, math.nan, "__v__")
    assert store.count("queued", "f") == 0  # nothing was taken


def test_window_expires_and_restarts_at_first_use(store: UsageStore) -> None:
    assert reserve(store, "k", 3.0, 3.0, 0.4).granted
    assert not reserve(store, "k", 1.0, 3.0, 0.4).granted
    waited = wait_for(lambda: store.usage("k") == (0.0, 0.0))
    assert waited < 3.0
    assert reserve(store, "k", 3.0, 3.0, 100.0).granted  # a new window, of the new length
    used, resets_in = store.usage("k")
    assert used == pytest.approx(3.0) and resets_in > 95.0


def test_window_length_is_the_one_that_opened_it(store: UsageStore) -> None:
    assert reserve(store, "k", 1.0, 3.0, 100.0).granted
    assert reserve(store, "k", 1.0, 3.0, 10.0).granted
    used, resets_in = store.usage("k")
    assert used == pytest.approx(2.0) and resets_in > 90.0


def test_keys_are_independent(store: UsageStore) -> None:
    assert reserve(store, "a", 3.0, 3.0, 100.0).granted
    assert reserve(store, "b", 3.0, 3.0, 100.0).granted
    assert store.usage("c") == (0.0, 0.0)


def test_settle_corrects_clamps_and_ignores_dead_windows(store: UsageStore) -> None:
    assert store.admit(plan("a", reserve=[("k", 1.0, 3.0, 100.0)])).granted
    store.settle("f", "a", [("k", 0.1 - 1.0)])  # estimated 1.0, measured 0.1
    assert store.usage("k")[0] == pytest.approx(0.1)
    store.settle("f", "b", [("k", 0.5)])
    assert store.usage("k")[0] == pytest.approx(0.6)
    store.settle("f", "c", [("k", -5.0)])
    assert store.usage("k")[0] == 0.0
    store.settle("f", "d", [("nobody", 2.0)])
    assert store.usage("nobody") == (0.0, 0.0)
    assert reserve(store, "short", 1.0, 3.0, 0.3).granted
    wait_for(lambda: store.usage("short") == (0.0, 0.0))
    store.settle("f", "e", [("short", 2.0)])
    assert store.usage("short") == (0.0, 0.0)


def test_usage_keys_list_live_windows_whoever_spent_them(make_store: Factory) -> None:
    a, b = make_store(), make_store()
    assert a.usage_keys() == []
    assert reserve(a, "key:alpha", 1.0, 10.0, 100.0).granted
    assert reserve(b, "address:1.2.3.4", 1.0, 10.0, 100.0).granted  # another replica
    assert reserve(b, "key:short", 1.0, 10.0, 0.3).granted
    assert not reserve(b, "key:refused", 5.0, 1.0, 100.0).granted  # a refusal opens no window
    assert a.usage_keys() == ["address:1.2.3.4", "key:alpha", "key:short"]
    wait_for(lambda: "key:short" not in a.usage_keys())  # an expired window leaves the list
    a.reset("key:alpha")
    assert b.usage_keys() == ["address:1.2.3.4"]


def test_reset(store: UsageStore) -> None:
    assert reserve(store, "k", 3.0, 3.0, 100.0).granted
    store.reset("k")
    assert store.usage("k") == (0.0, 0.0)
    assert reserve(store, "k", 3.0, 3.0, 100.0).granted


# -- overrides ----------------------------------------------------------------------------


def test_overrides_merge_clear_and_version(store: UsageStore) -> None:
    versions = [store.overrides_version()]
    assert store.all_overrides() == {}
    store.set_overrides("key:bench", {"max_queued": 100})
    store.set_overrides("key:bench", {"weight": 2.5, "tier": "pro"})
    store.set_overrides("key:bench", {"max_queued": 7})
    store.set_overrides("session:x", {"gpu_seconds": 0.1})
    versions.append(store.overrides_version())
    assert store.all_overrides() == {
        "key:bench": {"max_queued": 7, "weight": 2.5, "tier": "pro"},
        "session:x": {"gpu_seconds": 0.1},
    }
    got = store.all_overrides()
    got["key:bench"]["weight"] = 99  # a copy: the store is not changed behind its back
    assert store.all_overrides()["key:bench"]["weight"] == 2.5
    store.clear_overrides("key:bench")
    versions.append(store.overrides_version())
    assert list(store.all_overrides()) == ["session:x"]
    assert versions == sorted(set(versions)), versions  # every change moved it


def test_an_override_set_through_one_handle_is_seen_through_another(make_store: Factory) -> None:
    one, two = make_store(), make_store()
    before = two.overrides_version()
    one.set_overrides("key:a", {"gpu_seconds": 0})
    assert two.overrides_version() != before
    assert two.all_overrides() == {"key:a": {"gpu_seconds": 0}}


# -- slots --------------------------------------------------------------------------------


def test_queued_slots_up_to_the_limit_then_refused_with_the_count(store: UsageStore) -> None:
    grants = [store.admit(plan(f"j{i}", queued=3)) for i in range(5)]
    assert [g.granted for g in grants] == [True, True, True, False, False]
    assert [g.held for g in grants[3:]] == [3, 3] and {g.refused_by for g in grants[3:]} == {"queued"}
    assert store.count("queued", "f") == 3
    assert store.admit(plan("j0", queued=3)).granted  # a retry of a holder
    assert store.count("running", "f") == 0 and store.count("queued", "g") == 0


def test_settle_frees_a_slot_once(store: UsageStore) -> None:
    assert store.admit(plan("a", queued=1)).granted
    assert not store.admit(plan("b", queued=1)).granted
    store.settle("f", "a")
    store.settle("f", "a")
    assert store.admit(plan("b", queued=1)).granted
    assert store.count("queued", "f") == 1


def test_limit_zero_and_infinite(store: UsageStore) -> None:
    assert not store.admit(plan("a", queued=0)).granted
    assert all(store.admit(plan(f"j{i}", "g")).granted for i in range(20))
    assert store.count("queued", "g") == 20


def test_a_lease_nobody_renews_expires_by_itself(store: UsageStore) -> None:
    assert store.admit(plan("crashed", queued=1, lease_s=0.4)).granted
    assert store.start_job("f", "crashed", 1, 0.4, 0.0, "__v__").granted
    assert store.count("running", "f") == 1
    assert store.admit(plan("next", queued=1)).granted  # its queued lease became a running one
    assert not store.start_job("f", "next", 1, 30.0, 0.0, "__v__").granted
    waited = wait_for(lambda: store.start_job("f", "next", 1, 30.0, 0.0, "__v__").granted)
    assert waited < 3.0
    assert store.count("running", "f") == 1  # only "next"
    assert store.renew([Lease("running", "f", "crashed")], 30.0).lost == (Lease("running", "f", "crashed"),)


def test_renewed_leases_outlive_their_first_expiry(store: UsageStore) -> None:
    held = [Lease("running", "f", "a"), Lease("queued", "f", "b")]
    for job in ("a", "b"):
        assert store.admit(plan(job, lease_s=0.5)).granted
    assert store.start_job("f", "a", 5, 0.5, 0.0, "__v__").granted
    start = time.monotonic()
    while time.monotonic() - start < 1.2:  # a renewer beating at lease / 5, for over two leases
        renewal = store.renew(held, 0.5)
        assert renewal.renewed == tuple(held) and renewal.lost == ()
        time.sleep(0.1)
    assert store.count("running", "f") == 1 and store.count("queued", "f") == 1
    wait_for(lambda: store.count("running", "f") == 0 and store.count("queued", "f") == 0)


def test_renew_reports_released_and_unknown_leases_as_lost(store: UsageStore) -> None:
    assert store.admit(plan("a")).granted and store.admit(plan("b")).granted
    store.settle("f", "b")
    renewal = store.renew([Lease("queued", "f", "a"), Lease("queued", "f", "b"), Lease("running", "x", "c")], 30.0)
    assert renewal.renewed == (Lease("queued", "f", "a"),)
    assert renewal.lost == (Lease("queued", "f", "b"), Lease("running", "x", "c"))
    assert store.renew([], 30.0).renewed == ()


def test_start_job_dispatches_within_the_running_limit(store: UsageStore) -> None:
    for job in ("a", "b"):
        assert store.admit(plan(job, queued=4)).granted
    first = store.start_job("f", "a", 1, 30.0, 0.0, "__v__")
    assert first.granted and first.held == 1
    assert store.count("queued", "f") == 1 and store.count("running", "f") == 1
    refused = store.start_job("f", "b", 1, 30.0, 0.0, "__v__")
    assert not refused.granted and refused.held == 1
    assert store.count("queued", "f") == 1  # b keeps its queued slot
    assert store.start_job("f", "a", 1, 30.0, 0.0, "__v__").granted  # a retry of the same dispatch
    store.settle("f", "a")
    assert store.start_job("f", "b", 1, 30.0, 0.0, "__v__").granted
    assert store.count("queued", "f") == 0
    assert store.start_job("f", "lost-its-queued-lease", 2, 30.0, 0.0, "__v__").granted  # admitted all the same
    assert store.count("running", "f") == 2


# -- rate windows -------------------------------------------------------------------------


def test_rate_window_admits_up_to_the_limit_and_says_when(store: UsageStore) -> None:
    grants = [store.admit(plan(f"j{i}", rate=3)) for i in range(4)]
    assert [g.granted for g in grants] == [True, True, True, False]
    assert (grants[3].refused_by, grants[3].held) == ("rate", 3)
    assert 55.0 < grants[3].retry_after_s <= 60.0
    assert store.admit(plan("j1", rate=3)).granted  # the same request counted once
    store.settle("f", "j2", forget_rate=True)
    assert store.admit(plan("j9", rate=3)).granted
    assert not store.admit(plan("j", "zero", rate=0)).granted


def test_rate_window_slides(store: UsageStore) -> None:
    assert store.admit(plan("a", rate=2, rate_window_s=0.5)).granted
    assert store.admit(plan("b", rate=2, rate_window_s=0.5)).granted
    refused = store.admit(plan("c", rate=2, rate_window_s=0.5))
    assert not refused.granted and 0.0 < refused.retry_after_s <= 0.5
    waited = wait_for(lambda: store.admit(plan("c", rate=2, rate_window_s=0.5)).granted)
    assert waited < 3.0


# -- service ------------------------------------------------------------------------------


def test_service_of_an_idle_flow_is_forgotten(make_store: Factory) -> None:
    store = make_store(service_ttl_s=0.3)
    assert store.admit(plan("a")).granted
    assert store.start_job("f", "a", 1, 30.0, 2.0, "__v__").granted
    assert service_of(store, ["f"]) == {"f": pytest.approx(2.0)}
    wait_for(lambda: service_of(store, ["f", "__v__"]) == {})
    store.settle("f", "a", service_delta=1.0)  # a correction to a forgotten counter starts at 0
    assert service_of(store, ["f"]) == {"f": pytest.approx(1.0)}


# -- a job's steps in one call: admit, start_job, settle --------------------------------


def _plan(
    job: str,
    *,
    queued: float = 2,
    rate: float | None = 3,
    quota: float = 1.0,
    address: float | None = 5.0,
    window_s: float = 100.0,
) -> AdmitPlan:
    reservations = [Reservation("c", 0.5, quota, window_s)]
    if address is not None:
        reservations.append(Reservation("addr-usage:1.2.3.4", 0.5, address, window_s))
    return AdmitPlan(
        key="f",
        job_id=job,
        max_queued=queued,
        lease_s=30.0,
        reservations=tuple(reservations),
        rate_limit=rate,
        rate_window_s=60.0,
        service=("f", "__v__"),
    )


def test_admit_takes_every_check_or_none(store: UsageStore) -> None:
    assert store.admit(AdmitPlan(key="f", job_id="seed", max_queued=9, lease_s=30.0)).granted
    assert store.start_job("f", "seed", 9, 30.0, 2.0, "__v__").granted  # f's service: 2.0, V: 0.0
    store.settle("f", "seed")
    first = store.admit(_plan("a"))
    assert first.granted and first.service == {"f": pytest.approx(2.0), "__v__": pytest.approx(0.0)}
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
    probe = store.admit(plan("probe", rate=2))
    assert probe.granted  # only "a" is in the rate window
    store.settle("f", "probe", forget_rate=True)

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
    assert store.start_job("f", "a", 1, 30.0, 0.0, "__v__").granted
    store.settle("f", "a", [("c", -0.2), ("addr-usage:1.2.3.4", 0.1)])
    assert store.count("running", "f") == 0 and store.count("queued", "f") == 1
    assert store.usage("c")[0] == pytest.approx(0.8)
    assert store.usage("addr-usage:1.2.3.4")[0] == pytest.approx(1.1)
    store.settle("f", "b", [("c", -0.5), ("gone", 1.0)], forget_rate=True)  # a queued job that left
    assert store.count("queued", "f") == 0 and store.usage("c")[0] == pytest.approx(0.3)
    assert store.usage("gone") == (0.0, 0.0)  # a dead window is not brought back
    grants = [store.admit(plan(f"n{i}", rate=3)).granted for i in range(3)]
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
    assert service_of(b, ["f", "__v__"]) == {"f": pytest.approx(1.0), "__v__": pytest.approx(0.0)}  # no charge
    assert b.count("queued", "f") == 2 and b.count("running", "f") == 1
    b.settle("f", "j1", [], service_delta=-0.25)  # it ran for less than its estimate
    assert b.start_job("f", "j2", 1, 30.0, 1.0, "__v__").granted  # served on A, not fresh on B
    assert service_of(a, ["f", "__v__"]) == {"f": pytest.approx(1.75), "__v__": pytest.approx(0.75)}
    assert a.admit(AdmitPlan(key="g", job_id="x", max_queued=1, lease_s=30.0)).granted
    assert a.start_job("g", "x", 1, 30.0, 0.5, "__v__").held == 1  # a new flow starts at V
    assert service_of(b, ["g"]) == {"g": pytest.approx(1.25)}
    assert service_of(b, ["__v__"]) == {"__v__": pytest.approx(0.75)}  # V is a maximum: g's start tag is V


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


def test_racing_dispatchers_never_exceed_max_running(make_store: Factory) -> None:
    seed = make_store()
    for n in range(40):
        assert seed.admit(plan(f"j{n}", "hot")).granted
    won = _race(make_store, 8, lambda s, n: s.start_job("hot", f"j{n % 40}", 2, 30.0, 0.0, "__v__").granted)
    assert seed.count("running", "hot") == 2
    assert won >= 2  # a retry of a granted start is granted again, never a third job
    assert seed.count("queued", "hot") == 38


def test_racing_admissions_never_exceed_the_rate_the_queue_or_the_quota(make_store: Factory) -> None:
    def admit(s: Any, n: int, queued: float, quota: float, rate: float = 1000) -> bool:
        wanted = AdmitPlan(
            key=f"hot{rate}",
            job_id=f"j{n}",
            max_queued=queued,
            lease_s=30.0,
            reservations=(Reservation(f"q{queued}-{rate}", 0.5, quota, 100.0),),
            rate_limit=rate,
            rate_window_s=60.0,
        )
        return bool(s.admit(wanted).granted)

    assert _race(make_store, 8, lambda s, n: admit(s, n, 1000, math.inf, rate=7)) == 7
    assert _race(make_store, 8, lambda s, n: admit(s, n, 3, math.inf)) == 3
    assert _race(make_store, 8, lambda s, n: admit(s, 1000 + n, 1000, 1.5)) == 3  # the quota: 3 x 0.5
    assert make_store().usage("q1000-1000")[0] == pytest.approx(1.5)  # refusals left nothing reserved
    assert make_store().count("queued", "hot1000") == 6


# -- Redis only: its clock, not ours ------------------------------------------------------------


def test_redis_reads_its_own_clock_not_the_callers(redis_server: Any) -> None:
    store = RedisStore.from_url(redis_server.url, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        first = plan("a", reserve=[("k", 1.0, 3.0, 100.0)])
        assert store.admit(first, now=0.0).granted  # a replica whose clock says 1970
        used, resets_in = store.usage("k", now=1e12)  # and one far in the future
        assert used == 1.0 and 95.0 < resets_in <= 100.0
        assert store.start_job("f", "a", 1, 30.0, 0.0, "__v__", now=1e12).granted
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
    assert a.admit(plan("j1", "key:alpha")).granted
    assert b.admit(plan("j2", "key:alpha")).granted  # the same client on another replica
    assert b.start_job("key:alpha", "j2", 1, 30.0, 0.0, "__v__").granted
    assert b.admit(plan("j3", "addr:10.0.0.1", lease_s=0.3)).granted
    assert b.start_job("addr:10.0.0.1", "j3", 1, 0.3, 0.0, "__v__").granted
    assert b.admit(plan("j4", "key:gone")).granted
    b.settle("key:gone", "j4")
    counts = a.slot_counts()
    assert counts == {"key:alpha": SlotCounts(queued=1, running=1), "addr:10.0.0.1": SlotCounts(running=1)}
    wait_for(lambda: "addr:10.0.0.1" not in a.slot_counts())  # its lease ran out
    assert b.slot_counts() == {"key:alpha": SlotCounts(queued=1, running=1)}
