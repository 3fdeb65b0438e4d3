"""GPU-second usage per client and operator overrides, kept where a restart cannot lose them.

Why this module exists: quotas are counted in GPU-seconds over a window (an hour by
default). If that count lived only in the scheduler's memory, restarting the GPU tier
(a deploy, a crash, a Space rebuild) would hand every client a fresh quota, and an
operator's emergency override ("cap key:nightly-bench at 2 queued") would vanish with it.
So usage and overrides live behind :class:`UsageStore`, and the scheduler talks to it
only through one atomic operation, :meth:`UsageStore.reserve` (check the limit and add
the cost in one step), plus :meth:`UsageStore.adjust` to settle a reservation with the
GPU time actually measured. Because check-and-add is one call, a store shared by several
replicas (a Redis store with a Lua script, say) can follow without touching the scheduler,
and two replicas can never both squeeze into the last GPU-second.

Windows are fixed and start at a key's first use: the window opened at ``t`` with length
``w`` counts everything until ``t + w``; the first reservation at or after that opens a
new, empty window. The window length is the one given to the reserve that opened it, so
an operator changing ``window_s`` takes effect at the next window.

Two stores: :class:`MemoryUsageStore` (tests, single process, nothing survives) and
:class:`SqliteUsageStore` (one file; several processes on one machine share it safely).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["UsageStore", "MemoryUsageStore", "SqliteUsageStore"]

_SLACK = 1e-9
"""Float slack so that three reservations of 0.1 fit a limit of 0.3."""


class UsageStore(Protocol):
    """Usage per key in fixed windows, and operator overrides per client id."""

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float) -> float | None:
        """Atomically add ``amount`` to ``key``'s window if the total stays within ``limit``.

        Returns None when reserved, else the seconds until the window resets (retry after).
        ``limit`` may be ``math.inf``.
        """
        ...

    def adjust(self, key: str, delta: float, now: float) -> None:
        """Add ``delta`` (may be negative; the total is clamped at 0) to the live window.

        Settles a reservation with the measured cost. Does nothing if the window expired.
        """
        ...

    def usage(self, key: str, now: float) -> tuple[float, float]:
        """``(used, resets_in_s)`` of the live window; ``(0.0, 0.0)`` when there is none."""
        ...

    def reset(self, key: str) -> None:
        """Forget ``key``'s usage."""
        ...

    def get_overrides(self, client_id: str) -> dict[str, Any]:
        """The operator overrides of one client (empty when none)."""
        ...

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        """Merge ``values`` into the client's overrides."""
        ...

    def clear_overrides(self, client_id: str) -> None:
        """Drop all overrides of one client."""
        ...

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        """Every client's overrides, by client id."""
        ...


@dataclass
class _Window:
    used: float
    start: float
    window_s: float

    def live(self, now: float) -> bool:
        return self.start + self.window_s > now

    def resets_in(self, now: float) -> float:
        return max(0.0, self.start + self.window_s - now)


def _check_amounts(amount: float, limit: float, window_s: float) -> None:
    if not amount >= 0 or math.isnan(limit) or not window_s > 0:
        raise ValueError(f"bad reservation: amount={amount!r} limit={limit!r} window_s={window_s!r}")


def _reserve(window: _Window | None, amount: float, limit: float, window_s: float, now: float) -> tuple[_Window | None, float | None]:
    """The shared rule: ``(window to store or None to leave as is, retry_after or None)``."""
    if window is None or not window.live(now):
        window = _Window(used=0.0, start=now, window_s=window_s)
    if window.used + amount <= limit + _SLACK:
        window.used += amount
        return window, None
    return None, window.resets_in(now)


class MemoryUsageStore:
    """A :class:`UsageStore` in a dict; thread-safe, lost when the process ends."""

    def __init__(self, windows: dict[str, _Window] | None = None) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = dict(windows or {})
        self._overrides: dict[str, dict[str, Any]] = {}

    def window(self, key: str) -> _Window | None:
        """A copy of ``key``'s window (for ``write_behind.py``, which persists it)."""
        with self._lock:
            w = self._windows.get(key)
            return None if w is None else _Window(w.used, w.start, w.window_s)

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float) -> float | None:
        _check_amounts(amount, limit, window_s)
        with self._lock:
            window, retry = _reserve(self._windows.get(key), amount, limit, window_s, now)
            if window is not None:
                self._windows[key] = window
            return retry

    def adjust(self, key: str, delta: float, now: float) -> None:
        with self._lock:
            window = self._windows.get(key)
            if window is not None and window.live(now):
                window.used = max(0.0, window.used + delta)

    def usage(self, key: str, now: float) -> tuple[float, float]:
        with self._lock:
            window = self._windows.get(key)
            if window is None or not window.live(now):
                return (0.0, 0.0)
            return (window.used, window.resets_in(now))

    def reset(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)

    def get_overrides(self, client_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._overrides.get(client_id, {}))

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        with self._lock:
            self._overrides.setdefault(client_id, {}).update(values)

    def clear_overrides(self, client_id: str) -> None:
        with self._lock:
            self._overrides.pop(client_id, None)

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {cid: dict(values) for cid, values in self._overrides.items()}

    def close(self) -> None:
        """Nothing to release; here so both stores can be closed alike."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT PRIMARY KEY,
    used REAL NOT NULL,
    window_start REAL NOT NULL,
    window_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS overrides (
    client_id TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
"""


class SqliteUsageStore:
    """A :class:`UsageStore` in one SQLite file; survives restarts.

    Every read-modify-write runs in a ``BEGIN IMMEDIATE`` transaction, so the check and
    the add of :meth:`reserve` are atomic across threads (a lock) and across processes
    sharing the file (SQLite's write lock). WAL mode lets readers go on meanwhile.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; we open them ourselves.
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    # -- helpers ---------------------------------------------------------------------

    def _window(self, key: str) -> _Window | None:
        row = self._db.execute("SELECT used, window_start, window_s FROM usage WHERE key = ?", (key,)).fetchone()
        return None if row is None else _Window(used=row[0], start=row[1], window_s=row[2])

    def _put(self, key: str, window: _Window) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO usage (key, used, window_start, window_s) VALUES (?, ?, ?, ?)",
            (key, window.used, window.start, window.window_s),
        )

    def _write(self) -> "_Transaction":
        return _Transaction(self._db, self._lock)

    def windows(self) -> dict[str, _Window]:
        """Every stored window (``write_behind.py`` loads them at start)."""
        with self._lock:
            rows = self._db.execute("SELECT key, used, window_start, window_s FROM usage").fetchall()
        return {key: _Window(used=u, start=t, window_s=w) for key, u, t, w in rows}

    def write_windows(self, windows: dict[str, _Window | None]) -> None:
        """Store these windows as they are (None deletes), in one transaction."""
        with self._write():
            for key, window in windows.items():
                if window is None:
                    self._db.execute("DELETE FROM usage WHERE key = ?", (key,))
                else:
                    self._put(key, window)

    # -- usage -----------------------------------------------------------------------

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float) -> float | None:
        _check_amounts(amount, limit, window_s)
        with self._write():
            window, retry = _reserve(self._window(key), amount, limit, window_s, now)
            if window is not None:
                self._put(key, window)
            return retry

    def adjust(self, key: str, delta: float, now: float) -> None:
        with self._write():
            window = self._window(key)
            if window is not None and window.live(now):
                window.used = max(0.0, window.used + delta)
                self._put(key, window)

    def usage(self, key: str, now: float) -> tuple[float, float]:
        with self._lock:
            window = self._window(key)
        if window is None or not window.live(now):
            return (0.0, 0.0)
        return (window.used, window.resets_in(now))

    def reset(self, key: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM usage WHERE key = ?", (key,))

    # -- overrides -------------------------------------------------------------------

    def _read_overrides(self, client_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT data FROM overrides WHERE client_id = ?", (client_id,)).fetchone()
        return {} if row is None else dict(json.loads(row[0]))

    def get_overrides(self, client_id: str) -> dict[str, Any]:
        with self._lock:
            return self._read_overrides(client_id)

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        with self._write():
            merged = self._read_overrides(client_id)
            merged.update(values)
            self._db.execute(
                "INSERT OR REPLACE INTO overrides (client_id, data) VALUES (?, ?)",
                (client_id, json.dumps(merged, sort_keys=True)),
            )

    def clear_overrides(self, client_id: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM overrides WHERE client_id = ?", (client_id,))

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT client_id, data FROM overrides").fetchall()
        return {cid: dict(json.loads(data)) for cid, data in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) under the store's lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self._lock.release()
