"""One GPU tier's usage and overrides in a SQLite file, counted in memory and written behind.

Why: the scheduler reserves and settles GPU-seconds under the runner's lock, which the GPU
thread needs the moment a batch ends; a ``BEGIN IMMEDIATE ... COMMIT`` there could hold it
for seconds on a slow disk. So the windows live in memory (loaded from the file at start)
and a writer thread copies the changed ones to the file a few milliseconds later, and at
``close``: a restart does not hand every client a fresh quota. One tier owns its file (a
crash loses milliseconds); replicas share state through Redis. Overrides are rare, set
outside the lock, and go straight to the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from splitspace.gpu_backend.stores.usage import MemoryUsageStore, _Window
from splitspace.shared.contract.quotas import OverrideValues

log = logging.getLogger("splitspace.gpu")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (key TEXT PRIMARY KEY, used REAL NOT NULL, window_start REAL NOT NULL,
                                  window_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS overrides (client_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_BUMP_VERSION = "INSERT INTO meta VALUES ('overrides_version', 1) ON CONFLICT (name) DO UPDATE SET value = value + 1"


class SqliteUsageStore:
    """The file (WAL): usage windows and overrides; each write one ``BEGIN IMMEDIATE``."""

    def __init__(self, path: str | Path, *, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) under the lock."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db

    def _read(self, sql: str) -> list[Any]:
        with self._lock:
            return self._db.execute(sql).fetchall()

    def windows(self) -> dict[str, _Window]:
        rows = self._read("SELECT key, used, window_start, window_s FROM usage")
        return {key: _Window(used=u, start=t, window_s=w) for key, u, t, w in rows}

    def write_windows(self, windows: dict[str, _Window | None]) -> None:
        """Store these windows as they are (None deletes), in one transaction."""
        with self._transaction() as db:
            for key, w in windows.items():
                if w is None:
                    db.execute("DELETE FROM usage WHERE key = ?", (key,))
                else:
                    db.execute("INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?)", (key, w.used, w.start, w.window_s))

    def set_overrides(self, client_id: str, values: OverrideValues | None) -> None:
        """Merge ``values`` into the client's overrides (None: drop them); bump the version."""
        with self._transaction() as db:
            row = db.execute("SELECT data FROM overrides WHERE client_id = ?", (client_id,)).fetchone()
            if values is None:
                db.execute("DELETE FROM overrides WHERE client_id = ?", (client_id,))
            else:
                merged = json.dumps({**(json.loads(row[0]) if row else {}), **values}, sort_keys=True)
                db.execute("INSERT OR REPLACE INTO overrides VALUES (?, ?)", (client_id, merged))
            db.execute(_BUMP_VERSION)

    def clear_overrides(self, client_id: str) -> None:
        self.set_overrides(client_id, None)

    def all_overrides(self) -> dict[str, OverrideValues]:
        # each row holds what set_overrides wrote: checked values as a JSON object
        return {cid: json.loads(data) for cid, data in self._read("SELECT client_id, data FROM overrides")}

    def overrides_version(self) -> int:
        rows = self._read("SELECT value FROM meta WHERE name = 'overrides_version'")
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


class WriteBehindStore(MemoryUsageStore):
    """The memory store whose usage windows reach ``backing`` soon after each change;
    overrides go straight to the file."""

    def __init__(self, backing: SqliteUsageStore, *, flush_every_s: float = 0.05) -> None:
        super().__init__(backing.windows())
        self.backing = backing
        self._dirty: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._flush_every_s = flush_every_s
        self._writer = threading.Thread(target=self._write_loop, name="usage-writer", daemon=True)
        self._writer.start()

    def set_overrides(self, client_id: str, values: OverrideValues) -> None:
        self.backing.set_overrides(client_id, values)

    def clear_overrides(self, client_id: str) -> None:
        self.backing.clear_overrides(client_id)

    def all_overrides(self) -> dict[str, OverrideValues]:
        return self.backing.all_overrides()

    def overrides_version(self) -> int:
        return self.backing.overrides_version()

    def _changed(self, key: str) -> None:
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
        try:
            with self._lock:  # copies: the lock-held code changes them meanwhile
                windows = {k: (w := self._windows.get(k)) and dataclasses.replace(w) for k in keys}
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
