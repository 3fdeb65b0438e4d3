"""The jobs' embedded store: one SQLite file (``SPLITSPACE_JOBS_PATH``), for one frontend.

Every statement runs on one thread of the store's own (a single-thread executor), so the
event loop never waits on the file and the connection is only ever used by one thread.
WAL with ``synchronous=NORMAL``: a commit survives the process being killed (the case
"nothing accepted is lost" is about); an operating-system crash may lose the last
commits. Several frontends need Redis (``redis_store.py``): this file is one frontend's.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from splitspace.cpu_frontend.jobs.records import ENDED, Attempt, Delivery, Job, StoredFile

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, runner TEXT,
  idem TEXT, expires_at REAL, doc TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(owner, idem) WHERE idem IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, id);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs(runner) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS files (
  job_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, mime_type TEXT NOT NULL,
  data BLOB NOT NULL, PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS attempts (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts(job_id);
CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, runner TEXT, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runners (id TEXT PRIMARY KEY, lease_until REAL NOT NULL);
"""
_OPEN_SQL = "('queued', 'running')"


def _job(doc: str) -> Job:
    return Job.from_dict(json.loads(doc))


class SqliteJobStore:
    shared = False

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return fn(self._db)

    async def start(self, on_cancel: Callable[[str], None]) -> None:
        await self._run(lambda db: None)

    async def aclose(self) -> None:
        def close(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            await self._run(close)
        self._pool.shutdown(wait=True)

    # -- jobs ---------------------------------------------------------------------------
    async def create(self, job: Job, runner: str) -> Job:
        doc = json.dumps(job.to_dict())

        def create(db: sqlite3.Connection) -> Job:
            try:
                db.execute(
                    "INSERT INTO jobs (id, owner, status, runner, idem, doc) VALUES (?, ?, ?, ?, ?, ?)",
                    (job.id, job.owner, job.status, runner, job.idempotency_key, doc),
                )
                return job
            except sqlite3.IntegrityError:
                found = self._by_key(db, job.owner, job.idempotency_key)
                if found is None:
                    raise
                return found

        return await self._run(create)

    def _live(self, row: tuple[str, float | None] | None) -> Job | None:
        if row is None or (row[1] is not None and row[1] <= self._clock()):
            return None
        return _job(row[0])

    def _by_key(self, db: sqlite3.Connection, owner: str, key: str | None) -> Job | None:
        row = db.execute("SELECT doc, expires_at FROM jobs WHERE owner = ? AND idem = ?", (owner, key)).fetchone()
        return self._live(row)

    async def get(self, job_id: str) -> Job | None:
        return await self._run(
            lambda db: self._live(db.execute("SELECT doc, expires_at FROM jobs WHERE id = ?", (job_id,)).fetchone())
        )

    async def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        return await self._run(lambda db: self._by_key(db, owner, key))

    async def save(self, job: Job) -> bool:
        doc = json.dumps(job.to_dict())
        ended = job.status in ENDED

        def save(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                f"UPDATE jobs SET status = ?, doc = ?, expires_at = ?, runner = CASE WHEN ? THEN NULL ELSE runner END "
                f"WHERE id = ? AND status IN {_OPEN_SQL}",
                (job.status, doc, job.expires_at, ended, job.id),
            )
            return cur.rowcount == 1

        return await self._run(save)

    async def note_positions(self, positions: dict[str, tuple[int, float]]) -> None:
        return None  # one frontend: it answers from its door

    async def announce_cancel(self, job_id: str) -> None:
        return None

    async def page(self, owner: str, limit: int, before: str | None) -> list[Job]:
        def page(db: sqlite3.Connection) -> list[Job]:
            rows = db.execute(
                "SELECT doc FROM jobs WHERE owner = ? AND id < ? AND (expires_at IS NULL OR expires_at > ?) "
                "ORDER BY id DESC LIMIT ?",
                (owner, before or "\U0010ffff", self._clock(), limit),
            ).fetchall()
            return [_job(doc) for (doc,) in rows]

        return await self._run(page)

    # -- files and webhook attempts ----------------------------------------------------------
    async def put_files(self, job_id: str, files: Sequence[StoredFile], ttl_s: float) -> None:
        rows = [(job_id, i, f.name, f.mime_type, f.data) for i, f in enumerate(files)]

        def put(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)

        if rows:
            await self._run(put)

    async def file(self, job_id: str, index: int) -> StoredFile | None:
        def get(db: sqlite3.Connection) -> StoredFile | None:
            row = db.execute(
                "SELECT name, mime_type, data FROM files WHERE job_id = ? AND idx = ?", (job_id, index)
            ).fetchone()
            return None if row is None else StoredFile(row[0], row[1], bytes(row[2]))

        return await self._run(get)

    async def add_attempt(self, job_id: str, attempt: Attempt, ttl_s: float) -> None:
        doc = json.dumps(attempt.to_dict())
        await self._run(lambda db: db.execute("INSERT INTO attempts (job_id, doc) VALUES (?, ?)", (job_id, doc)))

    async def attempts(self, job_id: str) -> list[Attempt]:
        rows = await self._run(
            lambda db: db.execute("SELECT doc FROM attempts WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()
        )
        return [Attempt.from_dict(json.loads(doc)) for (doc,) in rows]

    # -- deliveries -------------------------------------------------------------------------
    async def put_delivery(self, delivery: Delivery, runner: str) -> None:
        doc = json.dumps(delivery.to_dict())
        await self._run(
            lambda db: db.execute("INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?)", (delivery.id, runner, doc))
        )

    async def drop_delivery(self, delivery_id: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM deliveries WHERE id = ?", (delivery_id,)))

    # -- runners ----------------------------------------------------------------------------
    async def renew(self, runner: str, lease_s: float) -> None:
        until = self._clock() + lease_s
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO runners VALUES (?, ?)", (runner, until)))

    async def retire(self, runner: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM runners WHERE id = ?", (runner,)))

    async def adopt(self, runner: str) -> tuple[list[Job], list[Delivery]]:
        now = self._clock()

        def adopt(db: sqlite3.Connection) -> tuple[list[Job], list[Delivery]]:
            live = "(SELECT id FROM runners WHERE lease_until > ?)"
            db.execute("BEGIN IMMEDIATE")
            try:
                jobs = db.execute(
                    f"SELECT doc FROM jobs WHERE status IN {_OPEN_SQL} AND runner IS NOT ? "
                    f"AND (runner IS NULL OR runner NOT IN {live}) ORDER BY id",
                    (runner, now),
                ).fetchall()
                db.execute(
                    f"UPDATE jobs SET runner = ? WHERE status IN {_OPEN_SQL} AND runner IS NOT ? "
                    f"AND (runner IS NULL OR runner NOT IN {live})",
                    (runner, runner, now),
                )
                deliveries = db.execute(
                    f"SELECT doc FROM deliveries WHERE runner IS NOT ? AND (runner IS NULL OR runner NOT IN {live})",
                    (runner, now),
                ).fetchall()
                db.execute(
                    f"UPDATE deliveries SET runner = ? WHERE runner IS NOT ? "
                    f"AND (runner IS NULL OR runner NOT IN {live})",
                    (runner, runner, now),
                )
                db.execute("DELETE FROM runners WHERE lease_until <= ?", (now,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return ([_job(doc) for (doc,) in jobs], [Delivery.from_dict(json.loads(doc)) for (doc,) in deliveries])

        return await self._run(adopt)

    async def purge(self, now: float) -> int:
        def purge(db: sqlite3.Connection) -> int:
            gone = "(SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?)"
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"DELETE FROM files WHERE job_id IN {gone}", (now,))
                db.execute(f"DELETE FROM attempts WHERE job_id IN {gone}", (now,))
                n = db.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)).rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return int(n)

        return await self._run(purge)
