"""The frontends' in-flight cap per client, counted once for every frontend on one Redis.

Why: the door counts in its own process, so M frontends would let M times the cap through
(issue 12). With ``SPLITSPACE_REDIS_URL``, each request in flight also holds a lease in its
flow's sorted set, scored by its expiry on Redis' clock; *acquire* is one script (drop the
expired, count, refuse at the cap, else add). *Release* does no I/O: one background task
sends the queued drops and renews (or puts back) this frontend's leases every ``lease_s /
3``, so a dead frontend's leases expire within ``lease_s``. Redis down: ``closed`` refuses,
``local`` admits within this frontend's share of the cap. Design: docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio

from splitspace.shared.config.circuit_breaker import (
    DEFAULT_RETRY_S,
    CircuitBreaker,
    FailureMode,
    check_failure_mode,
    local_share,
)
from splitspace.shared.config.redis_client import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT_S,
    UNAVAILABLE_ERRORS,
    async_client,
    unreachable_reason,
)
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.errors import QUEUE_FULL, ServiceUnavailable, Throttled

log = logging.getLogger("splitspace.inflight")

_LUA_HEAD = """
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local LEASE = tonumber(ARGV[1])
local function touch(k)  -- the set expires with its last lease
  local top = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIREAT', k, top[2]) end
end
"""

_SCRIPTS = {
    # ARGV lease_ms, cap, our new lease, then our leases to drop first
    "acquire": """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', NOW)
for i = 4, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then return {0, n} end
redis.call('ZADD', KEYS[1], NOW + LEASE, ARGV[3]); touch(KEYS[1])
return {1, n + 1}
""",
    # ARGV lease_ms, then for each key: the count of leases to drop, those, of leases to keep, those
    "sync": """
local a = 2
for _, k in ipairs(KEYS) do
  for i = a + 1, a + tonumber(ARGV[a]) do redis.call('ZREM', k, ARGV[i]) end
  a = a + tonumber(ARGV[a]) + 1
  for i = a + 1, a + tonumber(ARGV[a]) do redis.call('ZADD', k, NOW + LEASE, ARGV[i]) end
  a = a + tonumber(ARGV[a]) + 1
  touch(k)
end
return 1
""",
}


@dataclass(frozen=True)
class Hold:
    """One admitted request's place in the ledger; give it back with ``release``."""

    flow: str
    in_redis: bool  # False: admitted from the local count while Redis was down
    token: int


class InflightLedger(Protocol):
    """``acquire`` counts one more request of a flow (None: nothing to release) or raises
    Throttled at the cap, ServiceUnavailable while Redis is down in ``closed`` mode;
    ``release`` never raises nor blocks, and twice is once."""

    async def acquire(self, flow: str, cap: int, local_count: int) -> Hold | None: ...
    def release(self, hold: Hold | None) -> None: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


class NullLedger:
    """No Redis: the door's own count is the cap, and every call here does nothing."""

    async def acquire(self, flow: str, cap: int, local_count: int) -> Hold | None: ...
    def release(self, hold: Hold | None) -> None: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


class RedisLedger:
    """The in-flight leases of every frontend on one Redis, used on one event loop."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        mode: FailureMode = "closed",
        replicas: int = 1,
        lease_s: float = 30.0,
        breaker: CircuitBreaker | None = None,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        check_failure_mode(mode, replicas)
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s!r}")
        self.mode, self.replicas, self.lease_s = mode, int(replicas), float(lease_s)
        self.breaker = breaker if breaker is not None else CircuitBreaker(DEFAULT_RETRY_S)
        self.frontend_id = uuid.uuid4().hex
        self._client, self._prefix = client, prefix
        self._lease_ms = str(max(1, round(self.lease_s * 1000)))
        self._wait_s = 3 * timeout_s  # longest aclose waits for the background task
        self._scripts = {name: client.register_script(_LUA_HEAD + src) for name, src in _SCRIPTS.items()}
        self._held: dict[str, set[str]] = {}  # flow -> our leases in Redis, handed out
        self._pending: dict[str, set[str]] = {}  # flow -> our leases to drop from Redis
        self._lost_count = 0  # counts the times Redis may have lost one of our leases
        self._renewed_at = 0  # the count the last renewal that went through covered
        self._live: set[int] = set()
        self._tokens = itertools.count(1)
        self._sync_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._calls: set[asyncio.Future[Any]] = set()  # acquires at Redis
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def __repr__(self) -> str:  # never the client (its URL carries the password)
        return f"RedisLedger(mode={self.mode!r}, replicas={self.replicas}, lease_s={self.lease_s})"

    @property
    def synced(self) -> bool:
        """True while Redis holds every lease this frontend holds (no renewal pending)."""
        return self._renewed_at == self._lost_count

    def _key(self, flow: str) -> str:
        return f"{self._prefix}inflight-leases:{flow}"

    async def acquire(self, flow: str, cap: int, local_count: int) -> Hold | None:
        if self._task is None:
            raise RuntimeError("RedisLedger.acquire before start()")
        if self.breaker.allow() and (self.synced or await self._sync()):
            token = next(self._tokens)  # the drops stay queued: a renewal in flight may put them back
            lease, drops = f"{self.frontend_id}:{token}", sorted(self._pending.get(flow, ()))
            call = asyncio.ensure_future(
                self._scripts["acquire"](keys=[self._key(flow)], args=[self._lease_ms, str(cap), lease, *drops])
            )
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)
            try:
                reply: Any = await asyncio.shield(call)
            except UNAVAILABLE_ERRORS as exc:
                self._unsure(flow, lease)
                self._lost(exc)
            except asyncio.CancelledError:  # the caller left; the call runs on, and is undone
                call.add_done_callback(functools.partial(self._abandoned, flow, lease))
                raise
            except Exception:  # a bug mid-call: it may or may not have run
                self._unsure(flow, lease)
                raise
            else:
                self._answered()
                if int(reply[0]) != 1:
                    in_flight = f"{reply[1]} requests already in flight (max_running + max_queued = {cap})"
                    raise Throttled(QUEUE_FULL, in_flight, 1.0)
                self._held.setdefault(flow, set()).add(lease)
                return self._hold(flow, True, token)
        return self._without_redis(flow, cap, local_count)

    def release(self, hold: Hold | None) -> None:
        try:
            if hold is None or hold.token not in self._live:
                return
            self._live.discard(hold.token)
            if not hold.in_redis:
                return  # never counted in Redis: nothing to take back there
            lease = f"{self.frontend_id}:{hold.token}"
            self._held[hold.flow] = self._held.get(hold.flow, set()) - {lease}
            if not self._held[hold.flow]:
                del self._held[hold.flow]
            self._queue_drop(hold.flow, lease)
        except Exception:  # a finally block must not fail because of us
            log.exception("in-flight ledger: release failed")

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="inflight-ledger")

    async def aclose(self) -> None:
        """Stop the background task, take our leases out of Redis (best effort), close the client."""
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            self._wake.set()
            await asyncio.wait([task], timeout=self._wait_s)  # it ends at its next turn
            if not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=self._wait_s)
        for flow, leases in self._held.items():
            self._pending.setdefault(flow, set()).update(leases)
        self._held.clear()
        with contextlib.suppress(Exception):
            await self._sync()
        await self._client.aclose()

    def _hold(self, flow: str, in_redis: bool, token: int | None = None) -> Hold:
        hold = Hold(flow, in_redis, next(self._tokens) if token is None else token)
        self._live.add(hold.token)
        return hold

    def _without_redis(self, flow: str, cap: int, local_count: int) -> Hold:
        retry_s = max(self.breaker.retry_after(), 1.0)
        if self.mode == "closed":
            raise ServiceUnavailable("the shared store (Redis) is unreachable; nothing was counted", retry_s)
        share = local_share(cap, self.replicas)
        if local_count >= share:
            raise Throttled(
                QUEUE_FULL,
                f"{local_count} requests already in flight (max_running + max_queued = {cap}; "
                f"{share} per frontend while the shared store is down)",
                1.0,
            )
        return self._hold(flow, False)

    def _abandoned(self, flow: str, lease: str, call: asyncio.Future[Any]) -> None:
        """An acquire whose caller was cancelled finished: give back what it took."""
        exc = None if call.cancelled() else call.exception()
        if call.cancelled() or exc is not None:
            self._unsure(flow, lease)
            if isinstance(exc, UNAVAILABLE_ERRORS):
                self._lost(exc)
            else:
                self.breaker.abandoned()  # no verdict: the next caller may probe
            return
        self._answered()
        if int(call.result()[0]) == 1:  # counted in Redis, never handed out: drop it
            self._queue_drop(flow, lease)

    def _queue_drop(self, flow: str, lease: str) -> None:
        self._pending.setdefault(flow, set()).add(lease)
        self._wake.set()

    def _unsure(self, flow: str, lease: str) -> None:
        """This lease may or may not be in Redis: drop it, and renew all ours first."""
        self._lost_count += 1
        self._queue_drop(flow, lease)

    def _lost(self, exc: BaseException) -> None:
        if self.breaker.failed():
            what = "refusing requests" if self.mode == "closed" else f"each frontend caps at cap / {self.replicas}"
            log.warning(
                "%s; in-flight caps: %s, retrying every %g s", unreachable_reason(exc), what, self.breaker.retry_s
            )

    def _answered(self) -> None:
        if self.breaker.succeeded():
            log.warning("shared store (Redis) reachable again: in-flight caps global again")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        beat_at = loop.time() + self.lease_s / 3
        while not self._closing:
            self._wake.clear()
            due = self._pending or not self.synced or loop.time() >= beat_at
            if due and self.breaker.allow():
                if await self._sync():
                    beat_at = loop.time() + self.lease_s / 3
                continue
            wait = self.breaker.retry_after() if self.breaker.is_open else beat_at - loop.time()
            waiter = asyncio.ensure_future(self._wake.wait())  # not wait_for: on 3.11 it can eat a cancel
            try:
                await asyncio.wait([waiter], timeout=max(0.05, wait))
            finally:
                waiter.cancel()

    async def _sync(self) -> bool:
        """Drop the queued leases and renew (or put back) every lease we hold, in one script;
        False when Redis did not answer."""
        async with self._sync_lock:
            covers = self._lost_count
            drops = {flow: set(leases) for flow, leases in self._pending.items()}
            flows = sorted(set(drops) | set(self._held))
            args = [self._lease_ms]
            for flow in flows:
                for leases in (drops.get(flow, set()), self._held.get(flow, set())):
                    args += [str(len(leases)), *sorted(leases)]
            try:
                if flows:
                    await self._scripts["sync"](keys=[self._key(flow) for flow in flows], args=args)
            except BaseException as exc:
                self._lost_count += 1  # it may have run or not: renew all first
                if isinstance(exc, UNAVAILABLE_ERRORS):
                    self._lost(exc)
                    return False
                raise
            pending = ((flow, leases - drops.get(flow, set())) for flow, leases in self._pending.items())
            self._pending = {flow: left for flow, left in pending if left}  # sent: leases are never reused
            self._renewed_at = max(self._renewed_at, covers)
            self._answered()
            return True


def open_ledger(
    settings: Settings, *, retry_s: float = DEFAULT_RETRY_S, prefix: str = DEFAULT_PREFIX
) -> InflightLedger:
    """The ledger a frontend uses, from its settings; call ``start()`` on the event loop."""
    if settings.redis_url is None:
        return NullLedger()
    return RedisLedger(
        async_client(settings.redis_url.get_secret_value()),
        mode=settings.redis_failure,
        replicas=settings.replicas,
        lease_s=settings.lease_s,
        breaker=CircuitBreaker(retry_s),
        prefix=prefix,
    )
