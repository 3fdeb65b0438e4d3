"""The jobs' store protocol, held by both stores alike (SQLite, and a real Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from splitspace.cpu_frontend.jobs.records import Attempt, Delivery, Job, StoredFile, Webhook, new_id
from splitspace.cpu_frontend.jobs.redis_store import RedisJobStore
from splitspace.cpu_frontend.jobs.sqlite_store import SqliteJobStore
from splitspace.cpu_frontend.jobs.store import JobStore
from splitspace.session.identity import Identity

ALICE = Identity("key:alice", "key", "free", "10.0.0.1")
BOB = Identity("key:bob", "key", "free", "10.0.0.2")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[Clock], JobStore]]:
    """A factory: stores made by one test share their data (as two frontends would)."""
    prefix = f"test:{uuid.uuid4().hex}:"
    made: list[JobStore] = []

    def make(clock: Clock) -> JobStore:
        if request.param == "sqlite":
            store: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite3", clock=clock)
        else:
            server = request.getfixturevalue("redis_server")
            store = RedisJobStore(server.url, prefix=prefix, clock=clock)
        made.append(store)
        return store

    yield make


def job(owner: Identity = ALICE, *, key: str | None = None, now: float = 1_800_000_000.0) -> Job:
    return Job(
        new_id("job_", now),
        owner.client_id,
        owner,
        "generate",
        ["a fox"],
        now,
        idempotency_key=key,
        webhook=Webhook("https://example.com/hook"),
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def started(store: JobStore) -> JobStore:
    await store.start(on_cancel=lambda job_id: None)
    return store


def test_create_get_and_idempotency_per_owner(make_store: Callable[[Clock], JobStore]) -> None:
    async def scenario() -> None:
        store = await started(make_store(Clock()))
        first = job(key="k1")
        assert (await store.create(first, "r1")).id == first.id
        again = await store.create(job(key="k1"), "r1")
        assert again.id == first.id, "the same owner's key gives the same job"
        other = job(BOB, key="k1")
        assert (await store.create(other, "r1")).id == other.id, "another owner's key is its own"
        got = await store.get(first.id)
        assert got is not None and got.to_dict() == first.to_dict()
        assert (await store.by_idempotency_key("key:alice", "k1")).id == first.id  # type: ignore[union-attr]
        assert await store.by_idempotency_key("key:alice", "k2") is None
        assert await store.get("job_nothing") is None
        await store.aclose()

    run(scenario())


def test_an_ended_job_is_final_and_expires(make_store: Callable[[Clock], JobStore]) -> None:
    async def scenario() -> None:
        clock = Clock()
        store = await started(make_store(clock))
        j = job(key="k")
        await store.create(j, "r1")
        assert await store.save(j.copy(status="running", started_at=clock.now))
        done = j.copy(status="succeeded", finished_at=clock.now, expires_at=clock.now + 60, outputs=[1])
        await store.put_files(j.id, [StoredFile("a.png", "image/png", b"\x89PNG")], 60)
        assert await store.save(done)
        assert not await store.save(j.copy(status="cancelled")), "an end is never overwritten"
        assert (await store.get(j.id)).status == "succeeded"  # type: ignore[union-attr]
        assert (await store.file(j.id, 0)) == StoredFile("a.png", "image/png", b"\x89PNG")
        clock.now += 61
        assert await store.get(j.id) is None, "expired: gone"
        assert await store.by_idempotency_key("key:alice", "k") is None
        assert await store.page("key:alice", 10, None) == []
        await store.purge(clock.now)
        assert await store.file(j.id, 0) is None or isinstance(store, RedisJobStore)
        await store.aclose()

    run(scenario())


def test_pages_newest_first_with_a_cursor(make_store: Callable[[Clock], JobStore]) -> None:
    async def scenario() -> None:
        store = await started(make_store(Clock()))
        ids = []
        for i in range(7):
            j = job(now=1_800_000_000.0 + i)
            ids.append(j.id)
            await store.create(j, "r1")
        await store.create(job(BOB), "r1")
        first = await store.page("key:alice", 3, None)
        assert [j.id for j in first] == ids[::-1][:3]
        rest = await store.page("key:alice", 10, first[-1].id)
        assert [j.id for j in rest] == ids[::-1][3:]
        await store.aclose()

    run(scenario())


def test_attempts_and_deliveries(make_store: Callable[[Clock], JobStore]) -> None:
    async def scenario() -> None:
        store = await started(make_store(Clock()))
        j = job()
        await store.create(j, "r1")
        a = Attempt("msg_1", "completed", 1, 5.0, False, 500, "HTTP 500", 10.0)
        await store.add_attempt(j.id, a, 60)
        await store.add_attempt(j.id, Attempt("msg_1", "completed", 2, 10.0, True, 200), 60)
        assert [x.attempt for x in await store.attempts(j.id)] == [1, 2]
        assert (await store.attempts(j.id))[0] == a
        d = Delivery("msg_2", j.id, j.owner, "https://example.com", "completed", "{}", 0, 1.0)
        await store.put_delivery(d, "r1")
        await store.drop_delivery("msg_2")
        await store.put_delivery(d, "r1")
        await store.aclose()

    run(scenario())


def test_orphans_are_adopted_once_their_runner_is_gone(make_store: Callable[[Clock], JobStore]) -> None:
    async def scenario() -> None:
        clock = Clock()
        a, b = await started(make_store(clock)), await started(make_store(clock))
        await a.renew("ra", 30)
        await b.renew("rb", 30)
        queued, running, ended = job(), job(), job()
        for j in (queued, running, ended):
            await a.create(j, "ra")
        await a.save(running.copy(status="running"))
        await a.save(ended.copy(status="failed", expires_at=clock.now + 60))
        d = Delivery("msg_x", queued.id, queued.owner, "https://example.com", "completed", "{}", 1, 2.0)
        await a.put_delivery(d, "ra")
        assert await b.adopt("rb") == ([], []), "a live runner's jobs are its own"
        await a.retire("ra")  # a clean stop: adopted at once
        jobs, deliveries = await b.adopt("rb")
        assert sorted(j.id for j in jobs) == sorted([queued.id, running.id])
        assert {j.id: j.status for j in jobs}[running.id] == "running"
        assert deliveries == [d]
        assert await b.adopt("rb") == ([], []), "adopted once"
        # a runner that dies (stops renewing) loses its jobs when its lease ends
        late = job()
        await b.create(late, "rb")
        await a.renew("ra", 30)
        assert await a.adopt("ra") == ([], [])
        if isinstance(b, SqliteJobStore):
            clock.now += 31
        else:  # Redis leases run on Redis' clock: a lease of 0 ms has ended at once
            await b.renew("rb", 0)
        jobs, _ = await a.adopt("ra")
        assert {j.id for j in jobs} >= {late.id}
        await a.aclose()
        await b.aclose()

    run(scenario())
