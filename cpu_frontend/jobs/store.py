"""Where jobs live: one protocol, written once per backend (``sqlite_store.py``, ``redis_store.py``).

Why it exists: nothing accepted may be lost, so a job is a row before its caller hears
202, and whatever happens to it after is a write. The protocol is async (the runner and
the routes run on the event loop); the SQLite store does its I/O on one thread of its
own, the Redis store with redis-py's asyncio client.

*Ownership.* Each frontend process is a *runner* with a lease (``renew`` every third of
it). Open jobs (queued, running) and pending webhook deliveries belong to the runner that
accepted or adopted them. A runner that stops cleanly gives its lease back (``retire``);
one that dies stops renewing. Either way its open jobs and deliveries become orphans that
the next ``adopt`` of any live runner takes over (the runner then requeues the queued
ones at its door and fails the running ones: their stream to the GPU tier died with
their frontend).

*Ends are final.* :meth:`JobStore.save` writes a job only while the stored one is still
open, so a cancel (on any frontend) and the run's own end never overwrite each other: the
first to end a job wins, the other learns it from ``False``.

*Expiry.* An ended job has ``expires_at`` (``SPLITSPACE_JOB_TTL_S`` after its end); from
then on ``get`` answers None, and ``purge`` (or Redis' own expiry) deletes it with its
files, webhook attempts and idempotency key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from splitspace.cpu_frontend.jobs.records import Attempt, Delivery, Job, StoredFile


class JobStore(Protocol):
    shared: bool
    """True when other frontends read and write the same jobs (Redis)."""

    async def start(self, on_cancel: Callable[[str], None]) -> None:
        """Open the store; ``on_cancel(job_id)`` hears cancels made on other frontends."""

    async def aclose(self) -> None: ...

    async def create(self, job: Job, runner: str) -> Job:
        """Store a new open job held by ``runner``; if its owner already has a job under the
        same idempotency key, store nothing and return that one instead."""

    async def get(self, job_id: str) -> Job | None:
        """The job, or None (never was, or expired)."""

    async def by_idempotency_key(self, owner: str, key: str) -> Job | None: ...

    async def save(self, job: Job) -> bool:
        """Write the job if the stored one is still open (False: it has ended meanwhile, or
        is gone). Ending it releases it from its runner and starts its expiry."""

    async def note_positions(self, positions: dict[str, tuple[int, float]]) -> None:
        """The place and ETA of open jobs waiting at this frontend, for other frontends' answers."""

    async def announce_cancel(self, job_id: str) -> None:
        """Tell the other frontends that this job was cancelled (its runner drops it)."""

    async def page(self, owner: str, limit: int, before: str | None) -> list[Job]:
        """The owner's jobs, newest first, those with an id below ``before`` if given."""

    async def put_files(self, job_id: str, files: Sequence[StoredFile], ttl_s: float) -> None: ...

    async def file(self, job_id: str, index: int) -> StoredFile | None: ...

    async def add_attempt(self, job_id: str, attempt: Attempt, ttl_s: float) -> None: ...

    async def attempts(self, job_id: str) -> list[Attempt]: ...

    async def put_delivery(self, delivery: Delivery, runner: str) -> None:
        """Create or update a pending delivery held by ``runner``."""

    async def drop_delivery(self, delivery_id: str) -> None: ...

    async def renew(self, runner: str, lease_s: float) -> None: ...

    async def retire(self, runner: str) -> None:
        """Give the lease back now: this runner's open jobs and deliveries are orphans."""

    async def adopt(self, runner: str) -> tuple[list[Job], list[Delivery]]:
        """Take over the open jobs and pending deliveries of runners whose lease has ended."""

    async def purge(self, now: float) -> int:
        """Delete what expired before ``now``; how many jobs."""
