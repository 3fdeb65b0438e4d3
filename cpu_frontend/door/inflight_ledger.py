"""The frontends' in-flight cap per client, counted once for every frontend on one Redis.

Why it exists: the door (``cpu_frontend/door/door.py``) refuses a client with ``max_running +
max_queued`` requests in flight, but it counts in its own process, so M frontends let M
times the cap through (issue 12). With ``SPLITSPACE_REDIS_URL`` set, the door also asks
this ledger, which counts each flow's requests across all frontends; without it,
:func:`open_ledger` gives a :class:`NullLedger` and the door's own count is the whole story.

Design
------
*Keys* (prefix ``splitspace:``): ``{p}inflight:{flow}``, a hash with one field per
frontend (a uuid per process) holding that frontend's count; ``{p}frontends``, a sorted set
of live frontends scored by when their lease ends (Redis ``TIME`` in ms: no replica clock).

*Acquire* is one Lua script: drop the frontends whose lease ended, and their fields in the
flow's hash; sum the rest; refuse with ``Queue full`` if the sum reaches the cap, else
``HINCRBY`` our field. No race lets two frontends take the last place. The hash expires
``lease_s`` after its last refresh, so an idle flow leaves nothing behind.

*Release* is synchronous and does no I/O (it runs in ``finally`` blocks): it lowers the
local count and queues a decrement. One background task sends the queued decrements
(batched: one script for all flows released meanwhile), renews this frontend's lease and
its flows' hashes every ``lease_s / 3``, and repairs Redis after trouble. A release's
decrement also rides on this frontend's next acquire of the same flow, so a client calling
again through the same frontend is never refused by its own unsent release.

*A frontend that dies* (kill -9) stops renewing: within ``lease_s`` its lease ends and the
next acquire of each flow drops its counts.

*Repair ("reseed").* The invariant: while our lease is live in Redis, our fields there are
our true counts minus the decrements queued here. Whenever that may be false (at start; a
call that failed or timed out, so it may or may not have run; our lease found ended, e.g.
after a partition longer than ``lease_s``; a Redis restarted empty) the ledger is *unsynced*
and the background task rewrites every field of ours with absolute values and renews our
lease in one script, while no acquire is in flight. Only then do acquires go to Redis again.

*Redis down* (``SPLITSPACE_REDIS_FAILURE``; the shared :class:`CircuitBreaker` sends no call
for ``retry_s`` after a failure, then the background task probes): ``closed`` refuses with
``Service unavailable`` and the retry seconds; ``local`` admits while this frontend's own
count of the flow (the door's, ``local_count``) is under ``cap // replicas`` (at least 1,
0 stays 0). A hold taken then is not in Redis (``in_redis`` False): its release never
touches Redis, so nothing is counted twice when Redis returns, and holds taken in Redis
before the outage are written back by the repair. Recovery is automatic.

What is left: an acquire that timed out on a paused Redis may run when Redis resumes (one
extra count, corrected by the repair that follows); holds taken locally during an outage
are unknown to Redis until they end, so right after recovery a client may have up to its
local share on top of its global cap, for at most one request's time.
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

__all__ = ["Hold", "InflightLedger", "NullLedger", "RedisLedger", "open_ledger", "local_share"]

log = logging.getLogger("splitspace.inflight")

_LUA_HEAD = """
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local Z, ME, LEASE = KEYS[1], ARGV[1], tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', Z, '-inf', NOW)
local function renew_me()
  redis.call('ZADD', Z, NOW + LEASE, ME)
  redis.call('PEXPIRE', Z, 2 * LEASE)
end
local function lower(k, n)  -- our field in hash k, n lower (never below 0)
  if n <= 0 then return end
  local v = tonumber(redis.call('HGET', k, ME) or '0') - n
  if v > 0 then redis.call('HSET', k, ME, v) else redis.call('HDEL', k, ME) end
end
"""

_SCRIPTS = {
    # KEYS[1] frontends, KEYS[2] the flow's hash; ARGV me, lease_ms, cap, our queued decrement
    "acquire": """
if not redis.call('ZSCORE', Z, ME) then return {-1, 0} end
lower(KEYS[2], tonumber(ARGV[4]))
local h = redis.call('HGETALL', KEYS[2])
local sum = 0
for i = 1, #h, 2 do
  if h[i] == ME or redis.call('ZSCORE', Z, h[i]) then sum = sum + tonumber(h[i + 1])
  else redis.call('HDEL', KEYS[2], h[i]) end
end
if sum >= tonumber(ARGV[3]) then return {0, sum} end
redis.call('HINCRBY', KEYS[2], ME, 1)
redis.call('PEXPIRE', KEYS[2], LEASE)
return {1, sum + 1}
""",
    # KEYS[1] frontends, KEYS[i + 1] hashes; ARGV me, lease_ms, then the decrement of each hash
    "sync": """
if not redis.call('ZSCORE', Z, ME) then return -1 end
renew_me()
for i = 2, #KEYS do
  lower(KEYS[i], tonumber(ARGV[i + 1]))
  redis.call('PEXPIRE', KEYS[i], LEASE)
end
return 1
""",
    # KEYS[1] frontends, KEYS[i + 1] hashes; ARGV me, lease_ms, then our true count in each hash
    "reseed": """
for i = 2, #KEYS do
  local n = tonumber(ARGV[i + 1])
  if n > 0 then
    redis.call('HSET', KEYS[i], ME, n)
    redis.call('PEXPIRE', KEYS[i], LEASE)
  else
    redis.call('HDEL', KEYS[i], ME)
  end
end
renew_me()
return 1
""",
    # KEYS[1] frontends, KEYS[i + 1] hashes; ARGV me, lease_ms
    "retire": """
for i = 2, #KEYS do redis.call('HDEL', KEYS[i], ME) end
redis.call('ZREM', Z, ME)
return 1
""",
}


def _cap_refusal(in_flight: int, cap: int) -> Throttled:
    return Throttled(QUEUE_FULL, f"{in_flight} requests already in flight (max_running + max_queued = {cap})", 1.0)


@dataclass(frozen=True)
class Hold:
    """One admitted request's place in the ledger; give it back with ``release``."""

    flow: str
    in_redis: bool
    """Counted in Redis (False: admitted from the local count while Redis was down)."""
    token: int


class InflightLedger(Protocol):
    async def acquire(self, flow: str, cap: int, local_count: int) -> Hold | None:
        """Count one more request of ``flow``, or raise ``Throttled`` (Queue full) when its
        requests in flight on all frontends reach ``cap``, or ``ServiceUnavailable`` while
        Redis is down in ``closed`` mode. ``local_count``: this frontend's own in-flight
        count of the flow (used in ``local`` mode). None: nothing to release (no Redis)."""
        ...

    def release(self, hold: Hold | None) -> None:
        """Give the place back: synchronous, never raises, never blocks; twice is once."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class NullLedger:
    """No Redis: the door's own count is the cap."""

    async def acquire(self, flow: str, cap: int, local_count: int) -> Hold | None:
        return None

    def release(self, hold: Hold | None) -> None:
        return None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisLedger:
    """The in-flight counts of every frontend on one Redis; see the module docstring.

    Use it on one event loop: ``await start()`` there, ``acquire`` and ``release`` from it,
    ``await aclose()`` at shutdown. ``client`` connects lazily (a frontend starts while
    Redis is down)."""

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
        self.mode: FailureMode = mode
        self.replicas = int(replicas)
        self.lease_s = float(lease_s)
        self.breaker = breaker if breaker is not None else CircuitBreaker(DEFAULT_RETRY_S)
        self.frontend_id = uuid.uuid4().hex
        self._client = client
        self._prefix = prefix
        self._frontends = f"{prefix}frontends"
        self._lease_ms = str(max(1, round(self.lease_s * 1000)))
        self._wait_s = 3 * timeout_s  # longest an acquire waits for a repair in progress
        self._scripts = {name: client.register_script(_LUA_HEAD + src) for name, src in _SCRIPTS.items()}
        self._counts: dict[str, int] = {}  # flow -> our holds counted in Redis
        self._pending: dict[str, int] = {}  # flow -> releases not yet sent
        self._unsure: set[str] = set()  # flows whose field in Redis may be wrong
        self._live: set[int] = set()
        self._tokens = itertools.count(1)
        self._synced = asyncio.Event()  # set: Redis holds our counts (the invariant)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set: no acquire is at Redis
        self._idle.set()
        self._busy = 0
        self._repaired = asyncio.Event()  # set at the end of each repair, then replaced
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def __repr__(self) -> str:  # never the client (its URL carries the password)
        return f"RedisLedger(mode={self.mode!r}, replicas={self.replicas}, lease_s={self.lease_s})"

    @property
    def degraded(self) -> bool:
        """True while Redis is considered down."""
        return self.breaker.is_open

    @property
    def synced(self) -> bool:
        """True while acquires are decided in Redis (no repair pending)."""
        return self._synced.is_set()

    def _hash(self, flow: str) -> str:
        return f"{self._prefix}inflight:{flow}"

    # -- the door's calls ------------------------------------------------------------------

    async def acquire(self, flow: str, cap: int, local_count: int) -> Hold | None:
        if self._task is None:
            raise RuntimeError("RedisLedger.acquire before start()")
        for _ in range(2):  # a second time after a repair our ended lease called for
            if not self._synced.is_set() and not await self._await_sync():
                break
            dec = self._pending.pop(flow, 0)
            call = self._send_acquire(flow, cap, dec)
            try:
                reply: Any = await asyncio.shield(call)
            except UNAVAILABLE_ERRORS as exc:
                self._lost(exc, {flow})
                break
            except asyncio.CancelledError:  # the caller left; the call runs on, and is undone
                call.add_done_callback(functools.partial(self._abandoned, flow, dec))
                raise
            except Exception:  # a bug mid-call: it may or may not have run
                self._unsynced({flow})
                raise
            self._answered()
            granted, in_flight = int(reply[0]), int(reply[1])
            if granted == 1:
                self._counts[flow] = self._counts.get(flow, 0) + 1
                return self._hold(flow, True)
            if granted == 0:
                raise _cap_refusal(in_flight, cap)
            self._pending[flow] = self._pending.get(flow, 0) + dec  # our lease had ended: nothing ran
            self._unsynced(set())
        return self._without_redis(flow, cap, local_count)

    def release(self, hold: Hold | None) -> None:
        try:
            if hold is None or hold.token not in self._live:
                return
            self._live.discard(hold.token)
            if not hold.in_redis:
                return  # never counted in Redis: nothing to take back there
            left = self._counts.get(hold.flow, 0) - 1
            if left > 0:
                self._counts[hold.flow] = left
            else:
                self._counts.pop(hold.flow, None)
            self._pending[hold.flow] = self._pending.get(hold.flow, 0) + 1
            self._wake.set()
        except Exception:  # a finally block must not fail because of us
            log.exception("in-flight ledger: release failed")

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="inflight-ledger")

    async def aclose(self) -> None:
        """Stop the background task; take this frontend's counts out of Redis (best effort,
        bounded by the client's timeout); close the client."""
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            self._wake.set()
            await asyncio.wait([task], timeout=self._wait_s)  # it ends at its next turn
            if not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=self._wait_s)
        flows = set(self._counts) | set(self._pending) | self._unsure
        with contextlib.suppress(Exception):
            await self._scripts["retire"](
                keys=[self._frontends, *map(self._hash, sorted(flows))], args=[self.frontend_id, self._lease_ms]
            )
        self._synced.clear()
        await self._client.aclose()

    # -- decisions without Redis -------------------------------------------------------------

    def _hold(self, flow: str, in_redis: bool) -> Hold:
        hold = Hold(flow, in_redis, next(self._tokens))
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

    async def _await_sync(self) -> bool:
        """Wait (bounded) for the background task's next repair; False if Redis is down or
        the repair did not succeed in time."""
        if self.breaker.is_open:
            return False
        repaired = self._repaired
        self._wake.set()
        await _wait(repaired, self._wait_s)
        return self._synced.is_set()

    # -- calls -----------------------------------------------------------------------------

    def _send_acquire(self, flow: str, cap: int, dec: int) -> asyncio.Future[Any]:
        """The acquire script, running as its own task: counted as busy (a repair waits for
        it) until it is done, whether or not its caller still waits."""
        self._busy += 1
        self._idle.clear()
        call = asyncio.ensure_future(
            self._scripts["acquire"](
                keys=[self._frontends, self._hash(flow)], args=[self.frontend_id, self._lease_ms, str(cap), str(dec)]
            )
        )
        call.add_done_callback(self._not_busy)
        return call

    def _not_busy(self, _: asyncio.Future[Any]) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    def _abandoned(self, flow: str, dec: int, call: asyncio.Future[Any]) -> None:
        """An acquire whose caller was cancelled finished: give back what it took."""
        if call.cancelled():
            self._unsynced({flow})
            return
        exc = call.exception()
        if exc is not None:
            if isinstance(exc, UNAVAILABLE_ERRORS):
                self._lost(exc, {flow})
            else:
                self._unsynced({flow})
            return
        granted = int(call.result()[0])
        if granted == 1:  # counted in Redis, never handed out: release it
            self._pending[flow] = self._pending.get(flow, 0) + 1
            self._wake.set()
        elif granted == -1:
            self._pending[flow] = self._pending.get(flow, 0) + dec
            self._unsynced(set())

    # -- state -----------------------------------------------------------------------------

    def _unsynced(self, flows: set[str]) -> None:
        self._unsure |= flows
        self._synced.clear()
        self._wake.set()

    def _lost(self, exc: BaseException, flows: set[str]) -> None:
        self._unsynced(flows)
        if self.breaker.failed():
            what = "refusing requests" if self.mode == "closed" else f"each frontend caps at cap / {self.replicas}"
            log.warning("%s; in-flight caps: %s, retrying every %g s",
                        unreachable_reason(exc), what, self.breaker.retry_s)

    def _answered(self) -> None:
        if self.breaker.succeeded():
            log.warning("shared store (Redis) reachable again: in-flight caps global again")

    # -- the background task -----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        beat_at = loop.time()
        while not self._closing:
            self._wake.clear()
            timeout: float | None
            if not self._synced.is_set():
                if self.breaker.allow():
                    try:
                        await self._reseed()
                    finally:
                        repaired, self._repaired = self._repaired, asyncio.Event()
                        repaired.set()
                    beat_at = loop.time() + self.lease_s / 3
                timeout = None if self._synced.is_set() else max(0.05, self.breaker.retry_after())
                if timeout is not None:
                    await self._sleep(timeout)
                    continue
            if self._pending:
                await self._sync(set(self._pending))
                continue
            if loop.time() >= beat_at:
                await self._sync(set(self._counts))
                beat_at = loop.time() + self.lease_s / 3
                continue
            await self._sleep(beat_at - loop.time())

    async def _sleep(self, timeout_s: float) -> None:
        await _wait(self._wake, timeout_s)

    async def _sync(self, flows: set[str]) -> None:
        """Send the queued decrements of ``flows`` and renew our lease and their hashes."""
        ordered = sorted(flows)
        decs = [self._pending.pop(flow, 0) for flow in ordered]
        try:
            reply = await self._scripts["sync"](
                keys=[self._frontends, *map(self._hash, ordered)],
                args=[self.frontend_id, self._lease_ms, *map(str, decs)],
            )
        except UNAVAILABLE_ERRORS as exc:
            self._lost(exc, flows)
            return
        except BaseException:
            self._unsynced(flows)
            raise
        self._answered()
        if int(reply) != 1:  # our lease had ended: nothing was applied; the repair rewrites all
            log.warning("in-flight ledger: this frontend's lease in Redis had ended; rewriting its counts")
            self._unsynced(flows)

    async def _reseed(self) -> None:
        """Rewrite all our fields with absolute counts and renew our lease, with no acquire
        at Redis meanwhile (acquires wait while unsynced)."""
        if not await _wait(self._idle, self._wait_s):
            self.breaker.abandoned()
            return
        flows = sorted(set(self._counts) | set(self._pending) | self._unsure)
        counts = [self._counts.get(flow, 0) for flow in flows]
        self._pending.clear()  # the absolute counts already leave them out
        self._unsure.clear()
        try:
            await self._scripts["reseed"](
                keys=[self._frontends, *map(self._hash, flows)],
                args=[self.frontend_id, self._lease_ms, *map(str, counts)],
            )
        except UNAVAILABLE_ERRORS as exc:
            self._lost(exc, set(flows))
            return
        except BaseException:
            self._unsynced(set(flows))
            raise
        self._answered()
        self._synced.set()


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; whether it is set. (Not
    ``asyncio.wait_for``: on Python 3.11 it can swallow a cancellation.)"""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=max(0.0, timeout_s))
    finally:
        waiter.cancel()
    return event.is_set()


def open_ledger(
    settings: Settings, *, retry_s: float = DEFAULT_RETRY_S, prefix: str = DEFAULT_PREFIX
) -> InflightLedger:
    """The ledger a frontend uses, from its settings (at the edge): a :class:`NullLedger`
    without ``SPLITSPACE_REDIS_URL``, else a :class:`RedisLedger` with the failure mode,
    the replica count and the lease of the settings. Call ``start()`` on the event loop."""
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
