"""Usage counted in memory, persisted to SQLite from a background thread.

Why: the scheduler reserves and settles GPU-seconds while it holds the
runner's lock, which the GPU thread also needs the moment a batch ends. With
:class:`~gpu_backend.stores.usage.SqliteUsageStore` behind it, every admission and
every finished job waited for a ``BEGIN IMMEDIATE ... COMMIT`` under that
lock (up to the 10 s busy timeout on a slow disk), on the event loop and on
the GPU thread alike. Here the windows live in a
:class:`~gpu_backend.stores.usage.MemoryUsageStore` (what the lock-held code sees:
dict operations only), loaded from the file at start; each change marks its
key, and a writer thread copies marked windows to the file in one
transaction, a few milliseconds later. ``close`` writes what is left.

This is correct because one GPU tier owns its state file (the default
``SPLITSPACE_STATE_PATH`` is per process). A crash loses at most the last
few milliseconds of usage. Several replicas share state through Redis, not
through one SQLite file. Operator overrides are rare, set outside the lock,
and go straight to the file.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from splitspace.gpu_backend.stores.usage import MemoryUsageStore, SqliteUsageStore, _Window

log = logging.getLogger("splitspace.gpu")


class WriteBehindStore:
    """A :class:`~gpu_backend.stores.usage.UsageStore`: memory first, the SQLite file soon after."""

    def __init__(self, backing: SqliteUsageStore, *, flush_every_s: float = 0.05) -> None:
        self.backing = backing
        self._memory = MemoryUsageStore(backing.windows())
        self._dirty: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._flush_every_s = flush_every_s
        self._writer = threading.Thread(target=self._write_loop, name="usage-writer", daemon=True)
        self._writer.start()

    # -- usage: memory only, then marked for the writer -----------------------------
    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float) -> float | None:
        retry = self._memory.reserve(key, amount, limit, window_s, now)
        if retry is None:
            self._mark(key)
        return retry

    def adjust(self, key: str, delta: float, now: float) -> None:
        self._memory.adjust(key, delta, now)
        self._mark(key)

    def usage(self, key: str, now: float) -> tuple[float, float]:
        return self._memory.usage(key, now)

    def reset(self, key: str) -> None:
        self._memory.reset(key)
        self._mark(key)

    def forget_expired(self, now: float) -> int:
        """Drop the windows that ended from memory (the file keeps what it has)."""
        return self._memory.forget_expired(now)

    # -- overrides: straight through (operators' calls, outside the scheduler's lock) ---
    def get_overrides(self, client_id: str) -> dict[str, Any]:
        return self.backing.get_overrides(client_id)

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        self.backing.set_overrides(client_id, values)

    def clear_overrides(self, client_id: str) -> None:
        self.backing.clear_overrides(client_id)

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        return self.backing.all_overrides()

    def overrides_version(self) -> int:
        return self.backing.overrides_version()

    # -- the writer -------------------------------------------------------------------
    def _mark(self, key: str) -> None:
        with self._cond:
            self._dirty.add(key)
            self._cond.notify()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._closed:
                    self._cond.wait()
                if not self._dirty and self._closed:
                    return
            self._write_marked()
            with self._cond:  # gather a few more changes into the next transaction
                if not self._closed:
                    self._cond.wait(self._flush_every_s)

    def _write_marked(self) -> None:
        with self._cond:
            keys, self._dirty = self._dirty, set()
        if not keys:
            return
        windows: dict[str, _Window | None] = {key: self._memory.window(key) for key in keys}
        try:
            self.backing.write_windows(windows)
        except Exception as exc:  # a full or locked disk: keep counting, retry later
            log.warning("could not persist usage (%s); retrying", type(exc).__name__)
            with self._cond:
                self._dirty |= keys

    def flush(self) -> None:
        """Write every change made so far (blocking)."""
        self._write_marked()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._writer.join(timeout=10)
        self._write_marked()
        self.backing.close()
