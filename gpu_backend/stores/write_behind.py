"""One GPU tier's usage and overrides in a SQLite file, counted in memory and written behind.

Why: the scheduler reserves and settles GPU-seconds while it holds the runner's lock,
which the GPU thread also needs the moment a batch ends. With SQLite behind it, every
admission and every finished job waited for a ``BEGIN IMMEDIATE ... COMMIT`` under that
lock (up to the 10 s busy timeout on a slow disk). Here the windows live in a
:class:`~gpu_backend.stores.usage.MemoryUsageStore` (what the lock-held code sees: dict
operations only), loaded from the file at start; each change marks its key, and a writer
thread copies marked windows to the file in one transaction, a few milliseconds later.
``close`` writes what is left. So a restart (a deploy, a crash, a Space rebuild) does not
hand every client a fresh quota, nor drop an operator's override.

This is correct because one GPU tier owns its state file (the default
``SPLITSPACE_STATE_PATH`` is per process). A crash loses at most the last few
milliseconds of usage. Several replicas share state through Redis, not through one
SQLite file. Operator overrides are rare, set outside the lock, and go straight to the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from splitspace.gpu_backend.stores.usage import MemoryUsageStore, _Window

__all__ = ["SqliteUsageStore", "WriteBehindStore"]

log = logging.getLogger("splitspace.gpu")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (key TEXT PRIMARY KEY, used REAL NOT NULL, window_start REAL NOT NULL,
                                  window_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS overrides (client_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SqliteUsageStore:
    """The file: usage windows (read at start, written by :class:`WriteBehindStore`'s
    writer) and overrides. Every write is one ``BEGIN IMMEDIATE`` transaction under a
    lock; WAL mode lets readers go on meanwhile."""

    def __init__(self, path: str | Path, *, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; we open them ourselves.
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def _read(self, sql: str, *args: Any) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def windows(self) -> dict[str, _Window]:
        """Every stored window (loaded at start)."""
        rows = self._read("SELECT key, used, window_start, window_s FROM usage")
        return {key: _Window(used=u, start=t, window_s=w) for key, u, t, w in rows}

    def write_windows(self, windows: dict[str, _Window | None]) -> None:
        """Store these windows as they are (None deletes), in one transaction."""
        with self._transaction() as db:
            for key, w in windows.items():
                if w is None:
                    db.execute("DELETE FROM usage WHERE key = ?", (key,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO usage (key, used, window_start, window_s) VALUES (?, ?, ?, ?)",
                        (key, w.used, w.start, w.window_s),
                    )

    def _change_overrides(self, client_id: str, values: dict[str, Any] | None) -> None:
        """Merge ``values`` into the client's overrides (None: drop them) and bump the version."""
        with self._transaction() as db:
            row = db.execute("SELECT data FROM overrides WHERE client_id = ?", (client_id,)).fetchone()
            merged = {**(json.loads(row[0]) if row else {}), **(values or {})}
            if values is None:
                db.execute("DELETE FROM overrides WHERE client_id = ?", (client_id,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO overrides (client_id, data) VALUES (?, ?)",
                    (client_id, json.dumps(merged, sort_keys=True)),
                )
            db.execute(
                "INSERT INTO meta (name, value) VALUES ('overrides_version', 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1"
            )

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        self._change_overrides(client_id, values)

    def clear_overrides(self, client_id: str) -> None:
        self._change_overrides(client_id, None)

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        return {cid: dict(json.loads(data)) for cid, data in self._read("SELECT client_id, data FROM overrides")}

    def overrides_version(self) -> int:
        rows = self._read("SELECT value FROM meta WHERE name = 'overrides_version'")
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


class WriteBehindStore:
    """A :class:`~gpu_backend.stores.usage.UsageLedger` and ``OverrideStore``: memory
    first, the SQLite file soon after."""

    def __init__(self, backing: SqliteUsageStore, *, flush_every_s: float = 0.05) -> None:
        self.backing = backing
        self._memory = MemoryUsageStore(backing.windows())
        self._dirty: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._flush_every_s = flush_every_s
        self._writer = threading.Thread(target=self._write_loop, name="usage-writer", daemon=True)
        self._writer.start()
        self.set_overrides = backing.set_overrides  # operators' calls, outside the lock: straight through
        self.clear_overrides = backing.clear_overrides
        self.all_overrides = backing.all_overrides
        self.overrides_version = backing.overrides_version

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

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._writer.join(timeout=10)
        self._write_marked()
        self.backing.close()
