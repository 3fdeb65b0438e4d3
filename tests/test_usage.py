"""The scheduler's ledgers (memory, and SQLite written behind) obey the same rules; the
SQLite one also survives a restart."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitspace.gpu_backend.stores.usage import MemoryUsageStore
from splitspace.gpu_backend.stores.write_behind import SqliteUsageStore, WriteBehindStore
from tests.support import wait_for

Store = MemoryUsageStore | WriteBehindStore


@pytest.fixture(params=["memory", "write_behind"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryUsageStore()
    else:
        s = WriteBehindStore(SqliteUsageStore(tmp_path / "db" / "usage.sqlite3"))
    yield s
    s.close()


def used_in_file(path: Path, key: str) -> float | None:
    """What the file holds for ``key``'s window (None: no window), as a restart reads it."""
    backing = SqliteUsageStore(path)
    try:
        window = backing.windows().get(key)
        return None if window is None else window.used
    finally:
        backing.close()


def test_reserve_within_limit(store: Store) -> None:
    assert store.reserve("k", 1.0, 3.0, 100.0, now=10.0) is None
    assert store.reserve("k", 2.0, 3.0, 100.0, now=20.0) is None
    assert store.usage("k", now=20.0) == (3.0, 90.0)


def test_reserve_over_limit_returns_seconds_until_reset(store: Store) -> None:
    assert store.reserve("k", 2.0, 3.0, 100.0, now=10.0) is None
    assert store.reserve("k", 2.0, 3.0, 100.0, now=40.0) == pytest.approx(70.0)
    assert store.usage("k", now=40.0) == (2.0, 70.0)  # a refusal adds nothing


def test_float_sums_fit_their_limit(store: Store) -> None:
    for _ in range(3):
        assert store.reserve("k", 0.1, 0.3, 100.0, now=0.0) is None


def test_infinite_limit(store: Store) -> None:
    assert store.reserve("k", 1e9, math.inf, 100.0, now=0.0) is None


def test_bad_amounts_are_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.reserve("k", -1.0, 3.0, 100.0, now=0.0)
    with pytest.raises(ValueError):
        store.reserve("k", 1.0, 3.0, 0.0, now=0.0)


def test_window_expires_and_restarts_at_first_use(store: Store) -> None:
    assert store.reserve("k", 3.0, 3.0, 100.0, now=0.0) is None
    assert store.reserve("k", 1.0, 3.0, 100.0, now=99.0) == pytest.approx(1.0)
    assert store.usage("k", now=100.0) == (0.0, 0.0)
    assert store.reserve("k", 1.0, 3.0, 100.0, now=150.0) is None
    assert store.usage("k", now=150.0) == (1.0, 100.0)  # new window from 150


def test_window_length_is_the_one_that_opened_it(store: Store) -> None:
    assert store.reserve("k", 1.0, 3.0, 100.0, now=0.0) is None
    assert store.reserve("k", 1.0, 3.0, 10.0, now=50.0) is None  # still the 100 s window
    assert store.usage("k", now=50.0) == (2.0, 50.0)


def test_keys_are_independent(store: Store) -> None:
    assert store.reserve("a", 3.0, 3.0, 100.0, now=0.0) is None
    assert store.reserve("b", 3.0, 3.0, 100.0, now=0.0) is None
    assert store.usage("c", now=0.0) == (0.0, 0.0)


def test_adjust_settles_with_measured_cost(store: Store) -> None:
    store.reserve("k", 1.0, 3.0, 100.0, now=0.0)
    store.adjust("k", 0.1 - 1.0, now=5.0)  # estimated 1.0, measured 0.1
    assert store.usage("k", now=5.0)[0] == pytest.approx(0.1)
    store.adjust("k", 0.5, now=6.0)
    assert store.usage("k", now=6.0)[0] == pytest.approx(0.6)


def test_adjust_clamps_at_zero(store: Store) -> None:
    store.reserve("k", 1.0, 3.0, 100.0, now=0.0)
    store.adjust("k", -5.0, now=1.0)
    assert store.usage("k", now=1.0) == (0.0, 99.0)


def test_adjust_after_expiry_or_without_window_does_nothing(store: Store) -> None:
    store.reserve("k", 1.0, 3.0, 100.0, now=0.0)
    store.adjust("k", 2.0, now=100.0)
    assert store.usage("k", now=100.0) == (0.0, 0.0)
    store.adjust("nobody", 2.0, now=0.0)
    assert store.usage("nobody", now=0.0) == (0.0, 0.0)


def test_reset(store: Store) -> None:
    store.reserve("k", 3.0, 3.0, 100.0, now=0.0)
    store.reset("k")
    assert store.usage("k", now=1.0) == (0.0, 0.0)
    assert store.reserve("k", 3.0, 3.0, 100.0, now=1.0) is None


def test_overrides_merge_and_clear(store: Store) -> None:
    assert store.all_overrides() == {}
    store.set_overrides("key:bench", {"max_queued": 100})
    store.set_overrides("key:bench", {"weight": 2.5, "tier": "pro"})
    store.set_overrides("key:bench", {"max_queued": 7})
    store.set_overrides("session:x", {"gpu_seconds": 1.0})
    assert store.all_overrides() == {
        "key:bench": {"max_queued": 7, "weight": 2.5, "tier": "pro"},
        "session:x": {"gpu_seconds": 1.0},
    }
    got = store.all_overrides()
    got["key:bench"]["weight"] = 99  # a copy: the store is not changed behind its back
    assert store.all_overrides()["key:bench"]["weight"] == 2.5
    versions = [store.overrides_version()]
    store.clear_overrides("key:bench")
    versions.append(store.overrides_version())
    assert list(store.all_overrides()) == ["session:x"]
    assert versions[1] > versions[0]


def test_write_behind_store_persists_soon_and_on_close(tmp_path: Path) -> None:
    """Usage counted in memory reaches the file without a close (a crash loses
    milliseconds, not the window), and everything is there after a restart."""
    path = tmp_path / "usage.sqlite3"
    first = WriteBehindStore(SqliteUsageStore(path))
    first.reserve("session:a", 2.0, 3.0, 100.0, now=0.0)
    assert wait_for(lambda: used_in_file(path, "session:a") == 2.0, timeout_s=5)
    first.adjust("session:a", -0.5, now=1.0)
    first.set_overrides("key:bench", {"max_queued": 100})
    first.close()

    second = WriteBehindStore(SqliteUsageStore(path))  # the GPU tier restarted
    assert second.usage("session:a", now=10.0) == (1.5, 90.0)
    assert second.reserve("session:a", 2.0, 3.0, 100.0, now=10.0) == pytest.approx(90.0)
    assert second.all_overrides() == {"key:bench": {"max_queued": 100}}
    second.reset("session:a")
    second.close()
    assert used_in_file(path, "session:a") is None


def test_write_behind_store_does_no_disk_io_when_reserving(tmp_path: Path) -> None:
    """What the scheduler calls under the runner's lock touches memory only: a backing
    file whose every write blocks does not slow reserve, adjust or usage."""
    import threading

    class StuckDisk(SqliteUsageStore):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.release = threading.Event()
            self.writes = 0

        def write_windows(self, windows):  # type: ignore[no-untyped-def]
            self.writes += 1
            self.release.wait(10)
            super().write_windows(windows)

    disk = StuckDisk(tmp_path / "usage.sqlite3")
    store = WriteBehindStore(disk)
    store.reserve("k", 1.0, 100.0, 100.0, now=0.0)
    assert wait_for(lambda: disk.writes == 1, timeout_s=5)  # the writer is now stuck on the disk
    for i in range(50):
        assert store.reserve("k", 1.0, 100.0, 100.0, now=float(i)) is None
        store.adjust("k", -0.5, now=float(i))
    assert store.usage("k", now=50.0)[0] == pytest.approx(1.0 + 50 * 0.5)
    disk.release.set()
    store.close()
    assert used_in_file(tmp_path / "usage.sqlite3", "k") == pytest.approx(26.0)
