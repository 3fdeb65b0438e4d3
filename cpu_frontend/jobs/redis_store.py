"""The jobs on Redis (``SPLITSPACE_REDIS_URL``): every frontend answers for every job.

Keys (``splitspace:jobs:`` then):

- ``job:{id}``: a hash: ``status``, ``doc`` (the job's JSON), ``runner`` (while open),
  ``owner``, ``idem`` (its idempotency key's key), ``position``/``eta_s`` (its place at its
  runner's door, refreshed by that runner for the others' answers). Ended, it expires
  ``SPLITSPACE_JOB_TTL_S`` later (Redis deletes it; ``get`` also checks ``expires_at``).
- ``owner:{client}``: a sorted set of the client's job ids, all of score 0, read newest
  first by ``ZREVRANGEBYLEX`` (ids sort by creation); expired ids are dropped as met.
- ``idem:{client}:{sha256 of the key}``: the job id an Idempotency-Key gave.
- ``held:{runner}``, ``deliveries:{runner}``: what each runner holds; ``runners``: a
  sorted set of leases (Redis ``TIME`` in ms, no frontend clock); ``known``: the runners
  that may hold something (what ``adopt`` looks through).
- ``file:{id}:{n}`` (a hash: name, mime_type, b64), ``attempts:{id}`` (a list of JSON),
  ``delivery:{id}`` (a hash: doc, runner).
- channel ``cancel``: job ids cancelled, for the runner holding them to drop them.

Each change that must be atomic (create with its idempotency key, the "still open"
check of ``save``, adopting orphans) is one Lua script. The scripts name keys they build
from the prefix, so this store wants one Redis, not a cluster.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio

from splitspace.cpu_frontend.jobs.records import Attempt, Delivery, Job, StoredFile
from splitspace.shared.config.redis_client import DEFAULT_PREFIX, UNAVAILABLE_ERRORS, async_client

log = logging.getLogger("splitspace.jobs")

_OPEN = "local function open(s) return s == 'queued' or s == 'running' end\n"
_SCRIPTS = {
    # KEYS job, owner index, idem key ('' for none), held set, known; ARGV id, status, doc, runner, owner
    "create": """
if KEYS[3] ~= '' then
  local have = redis.call('GET', KEYS[3])
  if have then return have end
  redis.call('SET', KEYS[3], ARGV[1])
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'doc', ARGV[3], 'runner', ARGV[4], 'owner', ARGV[5], 'idem', KEYS[3])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[4])
return false
""",
    # KEYS job; ARGV status, doc, ended, ttl_ms, prefix, id
    "save": _OPEN
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur or not open(cur) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'doc', ARGV[2])
if ARGV[3] == '1' then
  local runner = redis.call('HGET', KEYS[1], 'runner')
  if runner then redis.call('SREM', ARGV[5] .. 'held:' .. runner, ARGV[6]) end
  redis.call('HDEL', KEYS[1], 'runner', 'position', 'eta_s')
  local ttl = math.max(1, tonumber(ARGV[4]))
  redis.call('PEXPIRE', KEYS[1], ttl)
  local idem = redis.call('HGET', KEYS[1], 'idem')
  if idem and idem ~= '' then redis.call('PEXPIRE', idem, ttl) end
end
return 1
""",
    # KEYS job; ARGV position, eta
    "position": _OPEN
    + """
if open(redis.call('HGET', KEYS[1], 'status')) then
  redis.call('HSET', KEYS[1], 'position', ARGV[1], 'eta_s', ARGV[2])
end
return 1
""",
    # KEYS delivery, known; ARGV doc, runner, prefix, id
    "put_delivery": """
local old = redis.call('HGET', KEYS[1], 'runner')
if old and old ~= ARGV[2] then redis.call('SREM', ARGV[3] .. 'deliveries:' .. old, ARGV[4]) end
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'runner', ARGV[2])
redis.call('SADD', ARGV[3] .. 'deliveries:' .. ARGV[2], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
""",
    # KEYS delivery; ARGV prefix, id
    "drop_delivery": """
local runner = redis.call('HGET', KEYS[1], 'runner')
if runner then redis.call('SREM', ARGV[1] .. 'deliveries:' .. runner, ARGV[2]) end
redis.call('DEL', KEYS[1])
return 1
""",
    # KEYS runners, known; ARGV runner, lease_ms
    "renew": """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]), ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
""",
    # KEYS runners, known; ARGV me, prefix
    "adopt": _OPEN
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local P, ME = ARGV[2], ARGV[1]
local jobs, dels = {}, {}
for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local lease = redis.call('ZSCORE', KEYS[1], r)
  if r ~= ME and (not lease or tonumber(lease) <= now) then
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'held:' .. r)) do
      local k = P .. 'job:' .. id
      if open(redis.call('HGET', k, 'status')) then
        redis.call('HSET', k, 'runner', ME)
        redis.call('SADD', P .. 'held:' .. ME, id)
        table.insert(jobs, id)
      end
    end
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'deliveries:' .. r)) do
      local k = P .. 'delivery:' .. id
      if redis.call('EXISTS', k) == 1 then
        redis.call('HSET', k, 'runner', ME)
        redis.call('SADD', P .. 'deliveries:' .. ME, id)
        table.insert(dels, id)
      end
    end
    redis.call('DEL', P .. 'held:' .. r, P .. 'deliveries:' .. r)
    redis.call('SREM', KEYS[2], r)
    redis.call('ZREM', KEYS[1], r)
  end
end
if #jobs > 0 or #dels > 0 then redis.call('SADD', KEYS[2], ME) end
return {jobs, dels}
""",
}


def _text(value: Any) -> str | None:
    """A reply's value as text (the client decodes replies; redis-py types them as bytes too)."""
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def _job(doc: str | None) -> Job | None:
    return None if doc is None else Job.from_dict(json.loads(doc))


class RedisJobStore:
    shared = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX + "jobs:",
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self.prefix = prefix
        self._clock = clock
        self._redis: redis.asyncio.Redis = async_client(url, timeout_s)
        self._scripts = {name: self._redis.register_script(src) for name, src in _SCRIPTS.items()}
        self._listener: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never the URL (it carries the password)
        return f"RedisJobStore(prefix={self.prefix!r})"

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, on_cancel: Callable[[str], None]) -> None:
        await self._redis.ping()
        self._listener = asyncio.create_task(self._listen(on_cancel))

    async def _listen(self, on_cancel: Callable[[str], None]) -> None:
        """Cancels made on other frontends; reconnects after trouble (a missed one is
        harmless: the job is ended in the store, and its runner finds that at its turn)."""
        while True:
            client = async_client(self._url, timeout_s=5.0)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._key("cancel"))
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and isinstance(message.get("data"), str):
                        on_cancel(message["data"])
            except UNAVAILABLE_ERRORS as exc:
                log.warning("jobs: the cancel channel is down (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._redis.aclose()

    # -- jobs ---------------------------------------------------------------------------
    def _idem_key(self, owner: str, key: str) -> str:
        return self._key("idem", owner, hashlib.sha256(key.encode()).hexdigest())

    async def create(self, job: Job, runner: str) -> Job:
        idem = "" if job.idempotency_key is None else self._idem_key(job.owner, job.idempotency_key)
        have = await self._script(
            "create",
            [
                self._key("job", job.id),
                self._key("owner", job.owner),
                idem,
                self._key("held", runner),
                self._key("known"),
            ],
            [job.id, job.status, json.dumps(job.to_dict()), runner, job.owner],
        )
        if have is None:
            return job
        found = await self.get(str(have))
        return job if found is None else found

    def _live(self, doc: Any, position: Any = None, eta: Any = None) -> Job | None:
        job = _job(_text(doc))
        if job is None or (job.expires_at is not None and job.expires_at <= self._clock()):
            return None
        if position is not None and not job.ended:
            job.position, job.eta_s = int(str(_text(position))), float(_text(eta) or 0.0)
        return job

    async def get(self, job_id: str) -> Job | None:
        doc, position, eta = await self._redis.hmget(self._key("job", job_id), ["doc", "position", "eta_s"])
        return self._live(doc, position, eta)

    async def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        job_id = _text(await self._redis.get(self._idem_key(owner, key)))
        return None if job_id is None else await self.get(job_id)

    async def save(self, job: Job) -> bool:
        ttl_ms = 0 if job.expires_at is None else int((job.expires_at - self._clock()) * 1000)
        done = await self._script(
            "save",
            [self._key("job", job.id)],
            [job.status, json.dumps(job.to_dict()), "1" if job.ended else "0", ttl_ms, self.prefix, job.id],
        )
        return bool(done)

    async def note_positions(self, positions: dict[str, tuple[int, float]]) -> None:
        if not positions:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, (position, eta) in positions.items():
                await self._scripts["position"](keys=[self._key("job", job_id)], args=[position, eta], client=pipe)
            await pipe.execute()

    async def announce_cancel(self, job_id: str) -> None:
        await self._redis.publish(self._key("cancel"), job_id)

    async def page(self, owner: str, limit: int, before: str | None) -> list[Job]:
        index = self._key("owner", owner)
        out: list[Job] = []
        top = f"({before}" if before else "+"
        while len(out) < limit:
            ids = [
                str(_text(i)) for i in await self._redis.zrevrangebylex(index, top, "-", start=0, num=limit - len(out))
            ]
            if not ids:
                break
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(self._key("job", job_id), ["doc", "position", "eta_s"])
                rows = await pipe.execute()
            gone = []
            for job_id, (doc, position, eta) in zip(ids, rows, strict=True):
                job = self._live(doc, position, eta)
                if job is None:
                    gone.append(job_id)
                else:
                    out.append(job)
            if gone:
                await self._redis.zrem(index, *gone)
            top = f"({ids[-1]}"
        return out

    # -- files and webhook attempts ----------------------------------------------------------
    async def put_files(self, job_id: str, files: Sequence[StoredFile], ttl_s: float) -> None:
        if not files:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for i, f in enumerate(files):
                key = self._key("file", job_id, str(i))
                pipe.hset(
                    key,
                    mapping={"name": f.name, "mime_type": f.mime_type, "b64": base64.b64encode(f.data).decode("ascii")},
                )
                pipe.pexpire(key, max(1, int(ttl_s * 1000)))
            await pipe.execute()

    async def file(self, job_id: str, index: int) -> StoredFile | None:
        name, mime, b64 = await self._redis.hmget(self._key("file", job_id, str(index)), ["name", "mime_type", "b64"])
        if b64 is None:
            return None
        return StoredFile(_text(name) or "file", _text(mime) or "application/octet-stream", base64.b64decode(b64))

    async def add_attempt(self, job_id: str, attempt: Attempt, ttl_s: float) -> None:
        key = self._key("attempts", job_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, json.dumps(attempt.to_dict()))
            pipe.pexpire(key, max(1, int(ttl_s * 1000)))
            await pipe.execute()

    async def attempts(self, job_id: str) -> list[Attempt]:
        docs = await self._redis.lrange(self._key("attempts", job_id), 0, -1)
        return [Attempt.from_dict(json.loads(doc)) for doc in docs]

    # -- deliveries -------------------------------------------------------------------------
    async def put_delivery(self, delivery: Delivery, runner: str) -> None:
        await self._script(
            "put_delivery",
            [self._key("delivery", delivery.id), self._key("known")],
            [json.dumps(delivery.to_dict()), runner, self.prefix, delivery.id],
        )

    async def drop_delivery(self, delivery_id: str) -> None:
        await self._script("drop_delivery", [self._key("delivery", delivery_id)], [self.prefix, delivery_id])

    # -- runners ----------------------------------------------------------------------------
    async def renew(self, runner: str, lease_s: float) -> None:
        await self._script("renew", [self._key("runners"), self._key("known")], [runner, int(lease_s * 1000)])

    async def retire(self, runner: str) -> None:
        await self._redis.zrem(self._key("runners"), runner)

    async def adopt(self, runner: str) -> tuple[list[Job], list[Delivery]]:
        job_ids, delivery_ids = await self._script(
            "adopt", [self._key("runners"), self._key("known")], [runner, self.prefix]
        )
        jobs: list[Job] = []
        deliveries: list[Delivery] = []
        if job_ids:
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(self._key("job", job_id), "doc")
                docs = await pipe.execute()
            jobs = [job for doc in docs if (job := _job(_text(doc))) is not None]
        if delivery_ids:
            async with self._redis.pipeline(transaction=False) as pipe:
                for delivery_id in delivery_ids:
                    pipe.hget(self._key("delivery", delivery_id), "doc")
                docs = await pipe.execute()
            deliveries = [Delivery.from_dict(json.loads(doc)) for doc in docs if doc is not None]
        jobs.sort(key=lambda j: j.id)
        return jobs, deliveries

    async def purge(self, now: float) -> int:
        return 0  # Redis expires ended jobs itself; owners' indexes drop them as met
