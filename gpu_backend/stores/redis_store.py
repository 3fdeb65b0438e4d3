"""The usage store on Redis: one state for any number of GPU tiers and frontends.

Why this module exists: each replica counting on its own multiplies every limit by the
replica count (LiteLLM's users' top complaint). With ``SPLITSPACE_REDIS_URL`` set, every
tier keeps the state admission reads and changes here instead (the
:class:`~gpu_backend.stores.usage.UsageStore` contract, the same one the memory and SQLite
stores keep; ``tests/test_store_contract.py`` runs one suite on all three).

Design
------
*One script per check-and-change.* Each method is one Lua script (``EVALSHA``, loaded
again by redis-py after a restart flushed the script cache): the check, the change and
the pruning of expired entries run in one step that no other client can interleave, so
two replicas cannot both take the last slot, GPU-second or rate place. Reads are scripts
too, so that they see Redis' time.

*Redis' clock, not the replicas'.* Every script reads ``TIME`` on the server; the
``now`` arguments of the protocol are ignored. Replicas whose clocks disagree (or a
container whose clock jumps) still agree on every window, lease and rate.

*A call that timed out never happens later.* A paused or overloaded Redis runs the
commands queued on its sockets when it resumes, after their callers have timed out and
been told "nothing was charged". So each call carries, as its first argument, the server
time after which its caller has given up (80 % of the socket timeout, on an estimate of
Redis' clock kept from a ``TIME`` round trip every 30 s); a script that starts later
returns "expired" and changes nothing (the caller learns the clock from that reply and
tries once more). What remains: redis-py reconnects once on a dropped connection and
re-sends, so a reset *after* a write ran but before its reply could apply that one write
twice (``acquire_slot``, ``move``, ``admit_rate``, ``release`` are idempotent per job id;
``reserve``, ``adjust``, ``add_service`` are not).

*Keys* (``prefix`` default ``splitspace:``; a Redis can host several deployments):

====================================  ==========  ==============================================
key                                   type        holds
====================================  ==========  ==============================================
``{p}usage:{key}``                    hash        ``used``, ``start``, ``window_s``; expires with its window
``{p}usage-index``                    sorted set  the usage hashes, scored by their window's end
``{p}overrides:c:{client_id}``        hash        one field per overridden limit, the value as JSON
``{p}overrides:index``                set         client ids that have overrides
``{p}overrides:version``              string      incremented by every override change
``{p}slot:{queued|running}:{key}``    sorted set  job id scored by its lease's expiry (server time)
``{p}slot-index``                     sorted set  the slot sets above, scored by their last expiry
``{p}rate:{key}``                     sorted set  job id scored by its admission time
``{p}svc:{flow_id}``                  string      the flow's virtual service; expires after
                                                  ``service_ttl_s`` without a change
``{p}nonce:{nonce}``                  string      the job admitted with an identity token's
                                                  nonce; expires after ``nonce_ttl_s``
====================================  ==========  ==============================================

Every key expires by itself once it holds nothing live, so clients seen once leave
nothing behind. Floats cross as ``%.17g`` strings (a Lua number returned to Redis would be
truncated to an integer). Single Redis (or a primary with replicas, Sentinel, a managed
service) only: :meth:`all_overrides` reads keys it does not declare, so not Redis Cluster.

*Errors.* Connection errors, timeouts, a loading, read-only or out-of-memory Redis become
:class:`~gpu_backend.stores.usage.StoreUnavailable` (a ``ServiceUnavailable``) at this boundary;
the URL (it carries the password) is never in a message. :mod:`gpu_backend.stores.resilient_store`
decides what a tier does then (``SPLITSPACE_REDIS_FAILURE``).

*Two clients.* :class:`RedisStore` (redis-py's blocking client) for threads, the GPU
thread among them; :class:`AsyncRedisStore` (``redis.asyncio``) with the same methods as
coroutines for the event loop. Both build their calls with one :class:`_Commands` (keys,
arguments, reply parsing), so they cannot drift apart. Timeouts default to 0.5 s and
redis-py's retries are cut to one immediate reconnect (its default is ten, with backoff):
``shared/config/redis_client.py``, which the frontend's in-flight ledger uses too.

*A job's path in three scripts.* ``admit`` (rate, queued slot, reservations and the
service read, all checked before anything is changed), ``start_job`` (the move and the
service charge) and ``settle`` (both leases, the usage corrections, the service correction,
the rate entry) are what :mod:`gpu_backend.stores.global_limits` calls per job; the single-step
methods remain for everything else (operators, the failover fallback, the tests).

Integration note (for the scheduler and the runner; the original plan, before the
combined scripts above replaced the single steps on a job's path)
-----------------------------------------------------------------------------------------
*The rule:* every store call is I/O (a loopback round trip is ~0.1-0.3 ms; a sick Redis
is up to the 0.5 s timeout) and must run outside the runner's lock, which the GPU thread
needs. Under the lock only in-memory bookkeeping.

* ``GpuRunner.admit`` (event loop): before taking the lock, with ``AsyncRedisStore``
  (or the sync store via ``asyncio.to_thread``): ``admit_rate(flow_id, job_id, rpm, 60)``;
  ``acquire_slot("queued", flow_id, job_id, max_queued, lease_s)``; ``reserve(client_id,
  cost, gpu_seconds, window_s)`` and for anonymous clients ``reserve(address_usage_key(addr),
  ...)``. A refusal by a later check undoes the earlier ones (``forget_rate``, ``release``,
  ``adjust(key, -cost)``). Then, under the lock, ``scheduler.submit`` with the admission
  already decided (only the local queue insert).
* Dispatch (``_dispatch_locked``, GPU thread or loop): the scheduler picks a candidate
  under the lock; outside it, ``move(flow_id, job_id, max_running, lease_s)`` takes the
  global running slot. Refused (the client runs on another replica): the job stays queued
  and its flow is skipped until a ``release`` of its running slot (poll ``count("running",
  flow)`` every ~lease/10 or at the next finish). In practice: a GPU thread takes the
  candidate under the lock, releases it, calls ``move``, re-takes it to start or put back.
* ``FairScheduler._start`` / ``finish``: the virtual service change ``c / w`` and the
  correction ``(g - c) / w`` go to ``add_service(flow_id, delta, floor=V)`` after the lock
  is released (the local copy stays the one the lock-held pick reads; refresh the local
  ``S_f`` of the candidate flows from ``service(flow_ids)`` once per dispatch, outside the
  lock, or from the value ``add_service`` returns).
* ``finish`` / ``cancel`` / a dropped waiter: ``release("running"|"queued", flow_id, job_id)``
  and ``adjust(...)`` with the measured cost, after the lock (GPU thread: the sync store).
* A renewer (one thread or task per tier): every ``lease_s / 3``, ``renew(leases)`` for
  all jobs this replica holds (one script for all of them). ``lost`` leases mean the job
  outlived its lease (a paused process): log it; the job keeps running.
* Overrides: ``splitspace.gpu_backend.ops.admin.Overrides`` caches them; re-read ``all_overrides()`` when
  ``overrides_version()`` moved (poll it once a second, or at each admission: one GET).
* ``splitspace quota reset``: ``reset(key)`` as now; ``list`` should merge the keys with
  live slots (``slot_counts()``, every replica's) with the clients this replica has seen.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from splitspace.gpu_backend.stores.usage import (
    DEFAULT_SERVICE_TTL_S,
    AdmitGrant,
    AdmitPlan,
    Lease,
    RateGrant,
    Renewal,
    SlotCounts,
    SlotGrant,
    SlotKind,
    StoreUnavailable,
    check_rate,
    check_reservation,
    check_service,
    check_slot,
)
from splitspace.shared.config.redis_client import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT_S,
    UNAVAILABLE_ERRORS,
    async_client,
    sync_client,
    unreachable_reason,
)

__all__ = ["RedisStore", "AsyncRedisStore", "DEFAULT_PREFIX", "DEFAULT_TIMEOUT_S"]

_SLACK = 1e-9  # the same float slack as the other stores
_UNAVAILABLE = UNAVAILABLE_ERRORS  # Redis cannot serve now (shared/config/redis_client.py)

# -- the scripts -------------------------------------------------------------------------

_LUA_COMMON = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(s) if s == 'inf' then return math.huge end return tonumber(s) end
local function fmt(x) return string.format('%.17g', x) end
local function ms(x) return string.format('%d', math.ceil(x * 1000) + 1) end
local function touch(k)  -- the set expires with its last lease; the index (the last
  local top = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')  -- of KEYS) lists live sets
  if top[2] then
    redis.call('PEXPIREAT', k, ms(tonumber(top[2])))
    redis.call('ZADD', KEYS[#KEYS], 'GT', top[2], k)
  end
end
local NOW = now_s()
-- ARGV[1]: the server time after which the caller has given up (its timeout); a call
-- that arrives later (a paused or slow Redis catching up) changes nothing.
if ARGV[1] ~= '' and NOW > tonumber(ARGV[1]) then return {'__expired__', fmt(NOW)} end
local ARG = {}
for i = 2, #ARGV do ARG[i - 1] = ARGV[i] end
"""

# The move of a job's slot from one set to another (queued -> running), the one body of
# ``slot_move`` and of ``start_job`` (which charges the flow's service on a grant).
# Returns whether the job holds the target slot, and how many the target set holds then.
_LUA_MOVE = """
local function move(source, target, job, limit, lease_s)
  redis.call('ZREMRANGEBYSCORE', source, '-inf', fmt(NOW))
  redis.call('ZREMRANGEBYSCORE', target, '-inf', fmt(NOW))
  local held = redis.call('ZCARD', target)
  local already = redis.call('ZSCORE', target, job)
  if not already and held >= num(limit) then return false, held end
  redis.call('ZADD', target, fmt(NOW + tonumber(lease_s)), job); touch(target)
  redis.call('ZREM', source, job)
  if already then return true, held end
  return true, held + 1
end
"""

_SCRIPTS: dict[str, str] = {
    # KEYS[1] usage hash, KEYS[2] the usage index; ARG amount, limit, window_s, slack
    "reserve": """
local now = NOW
local amount, limit, window_s, slack = tonumber(ARG[1]), num(ARG[2]), tonumber(ARG[3]), tonumber(ARG[4])
local h = redis.call('HMGET', KEYS[1], 'used', 'start', 'window_s')
local used, start, win = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
if not start or start + win <= now then used, start, win = 0, now, window_s end
if used + amount <= limit + slack then
  redis.call('HSET', KEYS[1], 'used', fmt(used + amount), 'start', fmt(start), 'window_s', fmt(win))
  redis.call('PEXPIREAT', KEYS[1], ms(start + win))
  redis.call('ZADD', KEYS[2], 'GT', fmt(start + win), KEYS[1])
  return false
end
return fmt(math.max(0, start + win - now))
""",
    # KEYS[1] usage hash; ARG delta
    "adjust": """
local now = NOW
local h = redis.call('HMGET', KEYS[1], 'used', 'start', 'window_s')
local used, start, win = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
if start and start + win > now then
  redis.call('HSET', KEYS[1], 'used', fmt(math.max(0, used + tonumber(ARG[1]))))
end
return false
""",
    # KEYS[1] usage hash
    "usage": """
local now = NOW
local h = redis.call('HMGET', KEYS[1], 'used', 'start', 'window_s')
local used, start, win = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
if not start or start + win <= now then return {'0', '0'} end
return {fmt(used), fmt(math.max(0, start + win - now))}
""",
    # KEYS[1] the usage index: the usage hashes of live windows (scored by their end)
    "usage_keys": """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(NOW))
local out = {}
for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', k) == 1 then out[#out + 1] = k else redis.call('ZREM', KEYS[1], k) end
end
return out
""",
    "delete": "redis.call('DEL', KEYS[1]) return false",
    # KEYS[1] client hash, KEYS[2] index, KEYS[3] version; ARG client_id, field, json, ...
    "overrides_set": """
for i = 2, #ARG, 2 do redis.call('HSET', KEYS[1], ARG[i], ARG[i + 1]) end
redis.call('SADD', KEYS[2], ARG[1])
return redis.call('INCR', KEYS[3])
""",
    "overrides_clear": """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARG[1])
return redis.call('INCR', KEYS[3])
""",
    "overrides_get": "return redis.call('HGETALL', KEYS[1])",
    # KEYS[1] index; ARG[1] the prefix of client hashes
    "overrides_all": """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARG[1] .. id)
end
return out
""",
    "overrides_version": "return tonumber(redis.call('GET', KEYS[1]) or '0')",
    # KEYS[1] slot set; ARG job, limit, lease_s
    "slot_acquire": """
local now = NOW
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local held = redis.call('ZCARD', KEYS[1])
local expires = fmt(now + tonumber(ARG[3]))
if redis.call('ZSCORE', KEYS[1], ARG[1]) then
  redis.call('ZADD', KEYS[1], expires, ARG[1]); touch(KEYS[1])
  return {1, held}
end
if held < num(ARG[2]) then
  redis.call('ZADD', KEYS[1], expires, ARG[1]); touch(KEYS[1])
  return {1, held + 1}
end
return {0, held}
""",
    # KEYS slot sets, one per lease, then the index; ARG[1] lease_s, ARG[i + 1] the job of KEYS[i]
    "slot_renew": """
local now = NOW
local expires = fmt(now + tonumber(ARG[1]))
local out = {}
for i = 1, #KEYS - 1 do
  local k = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', fmt(now))
  if redis.call('ZSCORE', k, ARG[i + 1]) then
    redis.call('ZADD', k, 'XX', expires, ARG[i + 1]); touch(k)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
""",
    "slot_release": "return redis.call('ZREM', KEYS[1], ARG[1])",
    # KEYS[1] source set, KEYS[2] target set; ARG job, limit, lease_s
    "slot_move": _LUA_MOVE + """
local moved, held = move(KEYS[1], KEYS[2], ARG[1], ARG[2], ARG[3])
return {moved and 1 or 0, held}
""",
    "slot_count": "return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(NOW), '+inf')",
    # KEYS[1] the index of slot sets
    "slot_counts": """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(NOW))
local out = {}
for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local n = redis.call('ZCOUNT', k, '(' .. fmt(NOW), '+inf')
  if n > 0 then out[#out + 1] = k; out[#out + 1] = n end
end
return out
""",
    # KEYS[1] rate set; ARG job, limit, window_s
    "rate_admit": """
local now = NOW
local w = tonumber(ARG[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - w))
local held = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARG[1]) then return {1, held, '0'} end
if held < num(ARG[2]) then
  redis.call('ZADD', KEYS[1], fmt(now), ARG[1])
  redis.call('PEXPIRE', KEYS[1], ms(w))
  return {1, held + 1, '0'}
end
if held == 0 then return {0, 0, fmt(w)} end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, held, fmt(math.max(0, tonumber(oldest[2]) + w - now))}
""",
    "rate_forget": "redis.call('ZREM', KEYS[1], ARG[1]) return false",
    # KEYS[1] service; ARG delta, floor ('' = none), ttl in ms
    "service_add": """
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARG[2] ~= '' then v = math.max(v, tonumber(ARG[2])) end
v = v + tonumber(ARG[1])
redis.call('SET', KEYS[1], fmt(v), 'PX', ARG[3])
return fmt(v)
""",
    "service_get": "return redis.call('MGET', unpack(KEYS))",
    # A job's whole admission (UsageStore.admit): every check first, then every change.
    # KEYS rate set, queued set, one usage hash per reservation, the service counters to
    # read, the nonce, the usage index, the slot index; ARG job, rate limit ('' = none), rate window_s, max_queued,
    # lease_s, number of reservations, slack, then amount, limit, window_s of each, then
    # the nonce ('' = none) and its ttl in ms. The nonce first, kept whatever the answer
    # (idempotent per job: a re-sent call is no replay).
    "admit": """
local now = NOW
local job, nres, slack = ARG[1], tonumber(ARG[6]), tonumber(ARG[7])
if ARG[8 + 3 * nres] ~= '' and not redis.call('SET', KEYS[#KEYS - 2], job, 'NX', 'PX', ARG[9 + 3 * nres])
    and redis.call('GET', KEYS[#KEYS - 2]) ~= job then
  return {'replay'}
end
local new_rate = false
if ARG[2] ~= '' then
  local w = tonumber(ARG[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - w))
  local held = redis.call('ZCARD', KEYS[1])
  if not redis.call('ZSCORE', KEYS[1], job) then
    if held >= num(ARG[2]) then
      if held == 0 then return {'rate', 0, fmt(w)} end
      local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
      return {'rate', held, fmt(math.max(0, tonumber(oldest[2]) + w - now))}
    end
    new_rate = true
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
local held = redis.call('ZCARD', KEYS[2])
if not redis.call('ZSCORE', KEYS[2], job) and held >= num(ARG[4]) then return {'queued', held} end
local windows = {}  -- usage key -> {used, start, window_s} once this admission is taken
for i = 1, nres do
  local k, a = KEYS[2 + i], 7 + 3 * (i - 1)
  local amount, limit, window_s = tonumber(ARG[a + 1]), num(ARG[a + 2]), tonumber(ARG[a + 3])
  local w = windows[k]
  if not w then
    local h = redis.call('HMGET', k, 'used', 'start', 'window_s')
    w = {tonumber(h[1]), tonumber(h[2]), tonumber(h[3])}
    if not w[2] or w[2] + w[3] <= now then w = {0, now, window_s} end
  end
  if w[1] + amount > limit + slack then
    return {'quota', i, fmt(math.max(0, w[2] + w[3] - now)), fmt(w[1])}
  end
  windows[k] = {w[1] + amount, w[2], w[3]}
end
if new_rate then
  redis.call('ZADD', KEYS[1], fmt(now), job)
  redis.call('PEXPIRE', KEYS[1], ms(tonumber(ARG[3])))
end
redis.call('ZADD', KEYS[2], fmt(now + tonumber(ARG[5])), job); touch(KEYS[2])
for k, w in pairs(windows) do
  redis.call('HSET', k, 'used', fmt(w[1]), 'start', fmt(w[2]), 'window_s', fmt(w[3]))
  redis.call('PEXPIREAT', k, ms(w[2] + w[3]))
  redis.call('ZADD', KEYS[#KEYS - 1], 'GT', fmt(w[2] + w[3]), k)
end
local svc = {}
for i = 3 + nres, #KEYS - 3 do svc[#svc + 1] = redis.call('GET', KEYS[i]) end
return {'ok', svc}
""",
    # A job is done (UsageStore.settle). KEYS queued set, running set, rate set, the
    # flow's service, then one usage hash per delta; ARG job, '1' to forget its rate
    # entry, the service delta ('' = none), the service ttl in ms, then the usage deltas.
    "settle": """
local now = NOW
redis.call('ZREM', KEYS[1], ARG[1])
redis.call('ZREM', KEYS[2], ARG[1])
if ARG[2] == '1' then redis.call('ZREM', KEYS[3], ARG[1]) end
if ARG[3] ~= '' then
  local v = tonumber(redis.call('GET', KEYS[4]) or '0') + tonumber(ARG[3])
  redis.call('SET', KEYS[4], fmt(v), 'PX', ARG[4])
end
for i = 5, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'used', 'start', 'window_s')
  local used, start, win = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if start and start + win > now then
    redis.call('HSET', KEYS[i], 'used', fmt(math.max(0, used + tonumber(ARG[i]))))
  end
end
return false
""",
    # Dispatch and charge (UsageStore.start_job): slot_move, then on a grant the flow's
    # service and the virtual time. KEYS queued set, running set, the flow's service, the
    # virtual time, the slot index; ARG job, limit, lease_s, service delta, ttl in ms.
    "start_job": _LUA_MOVE + """
local moved, held = move(KEYS[1], KEYS[2], ARG[1], ARG[2], ARG[3])
if not moved then return {0, held} end
local delta = tonumber(ARG[4])
local v = tonumber(redis.call('GET', KEYS[4]) or '0')
local s = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), v) + delta
redis.call('SET', KEYS[3], fmt(s), 'PX', ARG[5])
redis.call('SET', KEYS[4], fmt(math.max(v, s - delta)), 'PX', ARG[5])
return {1, held}
""",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(limit: float) -> str:
    """A limit for Lua: ``inf`` spelled out (``tonumber`` does not read it everywhere)."""
    return "inf" if math.isinf(limit) and limit > 0 else repr(float(limit))


def _float(value: float) -> str:
    return repr(float(value))


@dataclass(frozen=True)
class _Call:
    """One script run: which script, its keys and arguments, and how to read its reply."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    parse: Callable[[Any], Any]


def _none(reply: Any) -> None:
    return None


def _grant(reply: Any) -> SlotGrant:
    return SlotGrant(bool(int(reply[0])), int(reply[1]))


def _hash(reply: Any) -> dict[str, Any]:
    """A flat HGETALL reply (or a dict, under RESP3) of JSON values."""
    if isinstance(reply, dict):
        items = list(reply.items())
    else:
        items = list(zip(reply[0::2], reply[1::2], strict=False))
    return {_text(k): json.loads(_text(v)) for k, v in items}


class _Commands:
    """Builds each store operation as a :class:`_Call`: no I/O, shared by both clients."""

    def __init__(self, prefix: str, service_ttl_s: float) -> None:
        if not service_ttl_s > 0:
            raise ValueError(f"service_ttl_s must be positive, got {service_ttl_s!r}")
        self.prefix = prefix
        self.service_ttl_ms = str(max(1, math.ceil(service_ttl_s * 1000)))
        self._index = f"{prefix}overrides:index"
        self._version = f"{prefix}overrides:version"
        self._client_prefix = f"{prefix}overrides:c:"
        self._slot_index = f"{prefix}slot-index"
        self._usage_index = f"{prefix}usage-index"

    def _usage(self, key: str) -> str:
        return f"{self.prefix}usage:{key}"

    def _slot(self, kind: str, key: str) -> str:
        return f"{self.prefix}slot:{kind}:{key}"

    def reserve(self, key: str, amount: float, limit: float, window_s: float) -> _Call:
        check_reservation(amount, limit, window_s)
        args = (_float(amount), _num(limit), _float(window_s), repr(_SLACK))
        return _Call("reserve", (self._usage(key), self._usage_index), args, lambda r: None if r is None else float(r))

    def adjust(self, key: str, delta: float) -> _Call:
        return _Call("adjust", (self._usage(key),), (_float(delta),), _none)

    def usage(self, key: str) -> _Call:
        return _Call("usage", (self._usage(key),), (), lambda r: (float(r[0]), float(r[1])))

    def reset(self, key: str) -> _Call:
        return _Call("delete", (self._usage(key),), (), _none)

    def usage_keys(self) -> _Call:
        head = self._usage("")
        return _Call("usage_keys", (self._usage_index,), (), lambda r: sorted(_text(k).removeprefix(head) for k in r))

    def get_overrides(self, client_id: str) -> _Call:
        return _Call("overrides_get", (self._client_prefix + client_id,), (), _hash)

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> _Call:
        pairs = [part for name, value in values.items() for part in (str(name), json.dumps(value))]
        keys = (self._client_prefix + client_id, self._index, self._version)
        return _Call("overrides_set", keys, (client_id, *pairs), _none)

    def clear_overrides(self, client_id: str) -> _Call:
        keys = (self._client_prefix + client_id, self._index, self._version)
        return _Call("overrides_clear", keys, (client_id,), _none)

    def all_overrides(self) -> _Call:
        def parse(reply: Any) -> dict[str, dict[str, Any]]:
            return {_text(cid): _hash(values) for cid, values in zip(reply[0::2], reply[1::2], strict=False)}

        return _Call("overrides_all", (self._index,), (self._client_prefix,), parse)

    def overrides_version(self) -> _Call:
        return _Call("overrides_version", (self._version,), (), int)

    def acquire_slot(self, kind: SlotKind, key: str, job_id: str, limit: float, lease_s: float) -> _Call:
        check_slot(kind, limit, lease_s)
        keys = (self._slot(kind, key), self._slot_index)
        return _Call("slot_acquire", keys, (job_id, _num(limit), _float(lease_s)), _grant)

    def renew(self, leases: Iterable[Lease], lease_s: float) -> _Call | Renewal:
        """The renew call, or the (empty) answer when there is nothing to renew."""
        wanted = list(leases)
        for lease in wanted:
            check_slot(lease.kind, 0, lease_s)
        if not wanted:
            return Renewal((), ())

        def parse(reply: Any) -> Renewal:
            flags = [bool(int(x)) for x in reply]
            return Renewal(
                tuple(lease for lease, ok in zip(wanted, flags, strict=False) if ok),
                tuple(lease for lease, ok in zip(wanted, flags, strict=False) if not ok),
            )

        keys = (*(self._slot(lease.kind, lease.key) for lease in wanted), self._slot_index)
        return _Call("slot_renew", keys, (_float(lease_s), *(lease.job_id for lease in wanted)), parse)

    def release(self, kind: SlotKind, key: str, job_id: str) -> _Call:
        check_slot(kind, 0, 1.0)
        return _Call("slot_release", (self._slot(kind, key),), (job_id,), lambda r: bool(int(r)))

    def move(self, key: str, job_id: str, limit: float, lease_s: float, source: SlotKind, target: SlotKind) -> _Call:
        check_slot(source, limit, lease_s)
        check_slot(target, limit, lease_s)
        keys = (self._slot(source, key), self._slot(target, key), self._slot_index)
        return _Call("slot_move", keys, (job_id, _num(limit), _float(lease_s)), _grant)

    def count(self, kind: SlotKind, key: str) -> _Call:
        check_slot(kind, 0, 1.0)
        return _Call("slot_count", (self._slot(kind, key),), (), int)

    def slot_counts(self) -> _Call:
        head = f"{self.prefix}slot:"

        def parse(reply: Any) -> dict[str, SlotCounts]:
            counts: dict[str, dict[str, int]] = {}
            for name, n in zip(reply[0::2], reply[1::2], strict=False):
                kind, _, key = _text(name).removeprefix(head).partition(":")
                counts.setdefault(key, {})[kind] = int(n)
            return {key: SlotCounts(queued=c.get("queued", 0), running=c.get("running", 0))
                    for key, c in counts.items()}

        return _Call("slot_counts", (self._slot_index,), (), parse)

    def admit_rate(self, key: str, job_id: str, limit: float, window_s: float) -> _Call:
        check_rate(limit, window_s)

        def parse(reply: Any) -> RateGrant:
            return RateGrant(bool(int(reply[0])), int(reply[1]), float(reply[2]))

        return _Call("rate_admit", (f"{self.prefix}rate:{key}",), (job_id, _num(limit), _float(window_s)), parse)

    def forget_rate(self, key: str, job_id: str) -> _Call:
        return _Call("rate_forget", (f"{self.prefix}rate:{key}",), (job_id,), _none)

    def add_service(self, flow_id: str, delta: float, floor: float | None) -> _Call:
        check_service(delta, floor)
        floor_arg = "" if floor is None else _float(floor)
        args = (_float(delta), floor_arg, self.service_ttl_ms)
        return _Call("service_add", (f"{self.prefix}svc:{flow_id}",), args, float)

    def service(self, flow_ids: Iterable[str]) -> _Call | dict[str, float]:
        """The read call, or the (empty) answer when no flow is asked for."""
        wanted = list(dict.fromkeys(flow_ids))
        if not wanted:
            return {}

        def parse(reply: Any) -> dict[str, float]:
            return {f: float(v) for f, v in zip(wanted, reply, strict=False) if v is not None}

        return _Call("service_get", tuple(f"{self.prefix}svc:{f}" for f in wanted), (), parse)


    def admit(self, plan: AdmitPlan) -> _Call:
        check_slot("queued", plan.max_queued, plan.lease_s)
        if plan.rate_limit is not None:
            check_rate(plan.rate_limit, plan.rate_window_s)
        for r in plan.reservations:
            check_reservation(r.amount, r.limit, r.window_s)
        if plan.nonce and not plan.nonce_ttl_s > 0:
            raise ValueError(f"nonce_ttl_s must be positive, got {plan.nonce_ttl_s!r}")
        wanted = list(dict.fromkeys(plan.service))
        keys = (
            f"{self.prefix}rate:{plan.key}", self._slot("queued", plan.key),
            *(self._usage(r.key) for r in plan.reservations),
            *(f"{self.prefix}svc:{f}" for f in wanted), f"{self.prefix}nonce:{plan.nonce}",
            self._usage_index, self._slot_index,
        )
        rate = "" if plan.rate_limit is None else _num(plan.rate_limit)
        args = (
            plan.job_id, rate, _float(plan.rate_window_s), _num(plan.max_queued), _float(plan.lease_s),
            str(len(plan.reservations)), repr(_SLACK),
            *(x for r in plan.reservations for x in (_float(r.amount), _num(r.limit), _float(r.window_s))),
            plan.nonce, str(max(1, math.ceil(plan.nonce_ttl_s * 1000))),
        )

        def parse(reply: Any) -> AdmitGrant:
            tag = _text(reply[0])
            if tag == "ok":
                return AdmitGrant(True, service={f: float(v) for f, v in zip(wanted, reply[1], strict=False)
                                                 if v is not None})
            if tag == "rate":
                return AdmitGrant(False, "rate", held=int(reply[1]), retry_after_s=float(reply[2]))
            if tag == "queued":
                return AdmitGrant(False, "queued", held=int(reply[1]))
            if tag == "replay":
                return AdmitGrant(False, "replay")
            return AdmitGrant(False, "quota", quota=int(reply[1]) - 1, retry_after_s=float(reply[2]),
                              used=float(reply[3]))

        return _Call("admit", keys, args, parse)

    def settle(
        self, key: str, job_id: str, adjustments: Iterable[tuple[str, float]], forget_rate: bool, service_delta: float
    ) -> _Call:
        check_service(service_delta, None)
        deltas = [(k, d) for k, d in adjustments if d]
        keys = (self._slot("queued", key), self._slot("running", key), f"{self.prefix}rate:{key}",
                f"{self.prefix}svc:{key}", *(self._usage(k) for k, _ in deltas))
        args = (job_id, "1" if forget_rate else "", _float(service_delta) if service_delta else "",
                self.service_ttl_ms, *(_float(d) for _, d in deltas))
        return _Call("settle", keys, args, _none)

    def start_job(
        self, key: str, job_id: str, limit: float, lease_s: float, service_delta: float, vtime_key: str
    ) -> _Call:
        check_slot("running", limit, lease_s)
        check_service(service_delta, None)
        keys = (self._slot("queued", key), self._slot("running", key), f"{self.prefix}svc:{key}",
                f"{self.prefix}svc:{vtime_key}", self._slot_index)
        args = (job_id, _num(limit), _float(lease_s), _float(service_delta), self.service_ttl_ms)
        return _Call("start_job", keys, args, _grant)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(unreachable_reason(exc))  # type and first line: never the URL


_EXPIRED = "__expired__"


class _ServerClock:
    """Redis' ``TIME`` estimated from this process's monotonic clock (offset learnt from a
    ``TIME`` round trip, refreshed every ``RESYNC_S``), to stamp each call with the server
    time after which its caller has given up. Without it, a call that timed out on a
    paused Redis would still run when Redis resumes: refused here, charged there."""

    RESYNC_S = 30.0

    def __init__(self, give_up_s: float | None) -> None:
        self.give_up_s = give_up_s
        self._offset = 0.0
        self._synced_at = -math.inf

    @property
    def stale(self) -> bool:
        return self.give_up_s is not None and time.monotonic() - self._synced_at > self.RESYNC_S

    def learn(self, server_s: float, sent: float, received: float) -> None:
        self._offset = server_s - (sent + received) / 2
        self._synced_at = received

    def deadline(self) -> str:
        """The ``ARGV[1]`` of a call sent now ('' when the caller waits forever)."""
        if self.give_up_s is None:
            return ""
        return repr(time.monotonic() + self._offset + self.give_up_s)


def _expired_at(reply: Any) -> float | None:
    """The server time in an "arrived too late" reply, else None."""
    if isinstance(reply, list) and len(reply) == 2 and _text(reply[0]) == _EXPIRED:
        return float(reply[1])
    return None


def _give_up_s(client: Any, timeout_s: float | None) -> float | None:
    """When a caller of ``client`` gives up on a reply: 80 % of its socket timeout, the
    rest a margin for the reply's way back and the clock estimate's error."""
    if timeout_s is None:
        timeout_s = client.connection_pool.connection_kwargs.get("socket_timeout")
    return None if timeout_s is None else 0.8 * float(timeout_s)


class RedisStore:
    """A :class:`~gpu_backend.stores.usage.UsageStore` on Redis, for threads (blocking client).

    ``client`` is a ``redis.Redis``; :meth:`from_url` builds one with short timeouts.
    ``now`` arguments are accepted for the protocol and ignored: time is Redis' ``TIME``.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
        timeout_s: float | None = None,
    ) -> None:
        self._client = client
        self._cmd = _Commands(prefix, service_ttl_s)
        self._scripts = {name: client.register_script(_LUA_COMMON + src) for name, src in _SCRIPTS.items()}
        self._clock = _ServerClock(_give_up_s(client, timeout_s))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        prefix: str = DEFAULT_PREFIX,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
    ) -> RedisStore:
        """A store on a new client for ``url`` (``redis://``, ``rediss://``, ``unix://``).
        Connects lazily: a tier starts while Redis is down."""
        client = sync_client(url, timeout_s)
        return cls(client, prefix=prefix, service_ttl_s=service_ttl_s, timeout_s=timeout_s)

    def _sync_clock(self) -> None:
        sent = time.monotonic()
        seconds, micros = self._client.time()
        self._clock.learn(seconds + micros / 1e6, sent, time.monotonic())

    def _run(self, call: _Call | Any) -> Any:
        if not isinstance(call, _Call):
            return call  # answered without Redis (nothing asked)
        try:
            for _ in range(2):  # a second try after learning the clock from an "expired" reply
                if self._clock.stale:
                    self._sync_clock()
                sent = time.monotonic()
                reply = self._scripts[call.script](keys=list(call.keys), args=[self._clock.deadline(), *call.args])
                server_s = _expired_at(reply)
                if server_s is None:
                    return call.parse(reply)
                self._clock.learn(server_s, sent, time.monotonic())
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        raise StoreUnavailable("the shared store (Redis) answered too late twice (its clock jumped?)")

    def ping(self) -> bool:
        """True when Redis answers (a health check; raises nothing)."""
        try:
            return bool(self._client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False

    def reserve(self, key: str, amount: float, limit: float, window_s: float, now: float | None = None) -> float | None:
        return self._run(self._cmd.reserve(key, amount, limit, window_s))

    def adjust(self, key: str, delta: float, now: float | None = None) -> None:
        self._run(self._cmd.adjust(key, delta))

    def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
        return self._run(self._cmd.usage(key))

    def reset(self, key: str) -> None:
        self._run(self._cmd.reset(key))

    def usage_keys(self, now: float | None = None) -> list[str]:
        return self._run(self._cmd.usage_keys())

    def get_overrides(self, client_id: str) -> dict[str, Any]:
        return self._run(self._cmd.get_overrides(client_id))

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        self._run(self._cmd.set_overrides(client_id, values))

    def clear_overrides(self, client_id: str) -> None:
        self._run(self._cmd.clear_overrides(client_id))

    def all_overrides(self) -> dict[str, dict[str, Any]]:
        return self._run(self._cmd.all_overrides())

    def overrides_version(self) -> int:
        return self._run(self._cmd.overrides_version())

    def acquire_slot(
        self, kind: SlotKind, key: str, job_id: str, limit: float, lease_s: float, now: float | None = None
    ) -> SlotGrant:
        return self._run(self._cmd.acquire_slot(kind, key, job_id, limit, lease_s))

    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> Renewal:
        return self._run(self._cmd.renew(leases, lease_s))

    def release(self, kind: SlotKind, key: str, job_id: str) -> bool:
        return self._run(self._cmd.release(kind, key, job_id))

    def move(
        self,
        key: str,
        job_id: str,
        limit: float,
        lease_s: float,
        now: float | None = None,
        *,
        source: SlotKind = "queued",
        target: SlotKind = "running",
    ) -> SlotGrant:
        return self._run(self._cmd.move(key, job_id, limit, lease_s, source, target))

    def count(self, kind: SlotKind, key: str, now: float | None = None) -> int:
        return self._run(self._cmd.count(kind, key))

    def slot_counts(self, now: float | None = None) -> dict[str, SlotCounts]:
        return self._run(self._cmd.slot_counts())

    def admit_rate(self, key: str, job_id: str, limit: float, window_s: float, now: float | None = None) -> RateGrant:
        return self._run(self._cmd.admit_rate(key, job_id, limit, window_s))

    def forget_rate(self, key: str, job_id: str) -> None:
        self._run(self._cmd.forget_rate(key, job_id))

    def add_service(self, flow_id: str, delta: float, *, floor: float | None = None, now: float | None = None) -> float:
        return self._run(self._cmd.add_service(flow_id, delta, floor))

    def service(self, flow_ids: Iterable[str], now: float | None = None) -> dict[str, float]:
        return self._run(self._cmd.service(flow_ids))

    def admit(self, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
        return self._run(self._cmd.admit(plan))

    def start_job(
        self, key: str, job_id: str, limit: float, lease_s: float, service_delta: float, vtime_key: str,
        now: float | None = None,
    ) -> SlotGrant:
        return self._run(self._cmd.start_job(key, job_id, limit, lease_s, service_delta, vtime_key))

    def settle(
        self, key: str, job_id: str, adjustments: Iterable[tuple[str, float]] = (), *,
        forget_rate: bool = False, service_delta: float = 0.0, now: float | None = None,
    ) -> None:
        self._run(self._cmd.settle(key, job_id, adjustments, forget_rate, service_delta))

    def close(self) -> None:
        self._client.close()


class AsyncRedisStore:
    """The same store for the event loop (``redis.asyncio``): every method a coroutine.

    Not a ``UsageStore`` (its methods are awaitables) but the same contract, call for
    call; ``tests/test_store_contract.py`` runs the suite on it through a loop thread."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
        timeout_s: float | None = None,
    ) -> None:
        self._client = client
        self._cmd = _Commands(prefix, service_ttl_s)
        self._scripts = {name: client.register_script(_LUA_COMMON + src) for name, src in _SCRIPTS.items()}
        self._clock = _ServerClock(_give_up_s(client, timeout_s))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        prefix: str = DEFAULT_PREFIX,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
    ) -> AsyncRedisStore:
        client = async_client(url, timeout_s)
        return cls(client, prefix=prefix, service_ttl_s=service_ttl_s, timeout_s=timeout_s)

    async def _sync_clock(self) -> None:
        sent = time.monotonic()
        seconds, micros = await self._client.time()
        self._clock.learn(seconds + micros / 1e6, sent, time.monotonic())

    async def _run(self, call: _Call | Any) -> Any:
        if not isinstance(call, _Call):
            return call
        try:
            for _ in range(2):
                if self._clock.stale:
                    await self._sync_clock()
                sent = time.monotonic()
                script = self._scripts[call.script]
                reply = await script(keys=list(call.keys), args=[self._clock.deadline(), *call.args])
                server_s = _expired_at(reply)
                if server_s is None:
                    return call.parse(reply)
                self._clock.learn(server_s, sent, time.monotonic())
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        raise StoreUnavailable("the shared store (Redis) answered too late twice (its clock jumped?)")

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False

    async def reserve(
        self, key: str, amount: float, limit: float, window_s: float, now: float | None = None
    ) -> float | None:
        return await self._run(self._cmd.reserve(key, amount, limit, window_s))

    async def adjust(self, key: str, delta: float, now: float | None = None) -> None:
        await self._run(self._cmd.adjust(key, delta))

    async def usage(self, key: str, now: float | None = None) -> tuple[float, float]:
        return await self._run(self._cmd.usage(key))

    async def reset(self, key: str) -> None:
        await self._run(self._cmd.reset(key))

    async def usage_keys(self, now: float | None = None) -> list[str]:
        return await self._run(self._cmd.usage_keys())

    async def get_overrides(self, client_id: str) -> dict[str, Any]:
        return await self._run(self._cmd.get_overrides(client_id))

    async def set_overrides(self, client_id: str, values: dict[str, Any]) -> None:
        await self._run(self._cmd.set_overrides(client_id, values))

    async def clear_overrides(self, client_id: str) -> None:
        await self._run(self._cmd.clear_overrides(client_id))

    async def all_overrides(self) -> dict[str, dict[str, Any]]:
        return await self._run(self._cmd.all_overrides())

    async def overrides_version(self) -> int:
        return await self._run(self._cmd.overrides_version())

    async def acquire_slot(
        self, kind: SlotKind, key: str, job_id: str, limit: float, lease_s: float, now: float | None = None
    ) -> SlotGrant:
        return await self._run(self._cmd.acquire_slot(kind, key, job_id, limit, lease_s))

    async def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> Renewal:
        return await self._run(self._cmd.renew(leases, lease_s))

    async def release(self, kind: SlotKind, key: str, job_id: str) -> bool:
        return await self._run(self._cmd.release(kind, key, job_id))

    async def move(
        self,
        key: str,
        job_id: str,
        limit: float,
        lease_s: float,
        now: float | None = None,
        *,
        source: SlotKind = "queued",
        target: SlotKind = "running",
    ) -> SlotGrant:
        return await self._run(self._cmd.move(key, job_id, limit, lease_s, source, target))

    async def count(self, kind: SlotKind, key: str, now: float | None = None) -> int:
        return await self._run(self._cmd.count(kind, key))

    async def slot_counts(self, now: float | None = None) -> dict[str, SlotCounts]:
        return await self._run(self._cmd.slot_counts())

    async def admit_rate(
        self, key: str, job_id: str, limit: float, window_s: float, now: float | None = None
    ) -> RateGrant:
        return await self._run(self._cmd.admit_rate(key, job_id, limit, window_s))

    async def forget_rate(self, key: str, job_id: str) -> None:
        await self._run(self._cmd.forget_rate(key, job_id))

    async def add_service(
        self, flow_id: str, delta: float, *, floor: float | None = None, now: float | None = None
    ) -> float:
        return await self._run(self._cmd.add_service(flow_id, delta, floor))

    async def service(self, flow_ids: Iterable[str], now: float | None = None) -> dict[str, float]:
        return await self._run(self._cmd.service(flow_ids))

    async def admit(self, plan: AdmitPlan, now: float | None = None) -> AdmitGrant:
        return await self._run(self._cmd.admit(plan))

    async def start_job(
        self, key: str, job_id: str, limit: float, lease_s: float, service_delta: float, vtime_key: str,
        now: float | None = None,
    ) -> SlotGrant:
        return await self._run(self._cmd.start_job(key, job_id, limit, lease_s, service_delta, vtime_key))

    async def settle(
        self, key: str, job_id: str, adjustments: Iterable[tuple[str, float]] = (), *,
        forget_rate: bool = False, service_delta: float = 0.0, now: float | None = None,
    ) -> None:
        await self._run(self._cmd.settle(key, job_id, adjustments, forget_rate, service_delta))

    async def close(self) -> None:
        await self._client.aclose()

