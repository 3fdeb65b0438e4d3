"""The usage store on Redis: one state for any number of GPU tiers.

Why this module exists: each replica counting on its own multiplies every limit by the
replica count (LiteLLM's users' top complaint). With ``SPLITSPACE_REDIS_URL`` set, every
tier keeps the state admission reads and changes here (the
:class:`~gpu_backend.stores.usage.UsageStore` contract, the one the memory store keeps
too; ``tests/test_store_contract.py`` runs one suite on both).

*One script per step.* Each call is one Lua script (``EVALSHA``, loaded again by redis-py
after a restart flushed the script cache): the checks, the changes and the pruning of
expired entries run in one step that no other client can interleave, so two replicas
cannot both take the last slot, GPU-second or rate place. A job costs three: ``admit``
(nonce, rate, queued slot, reservations, all checked before anything is taken, and the
service read), ``start_job`` (the running slot and the service charge) and ``settle``.
Reads are scripts too, so that they see Redis' time.

*Redis' clock, not the replicas'.* Every script reads ``TIME`` on the server; the ``now``
arguments of the protocol are ignored.

*A call that timed out never happens later.* A paused or overloaded Redis runs the
commands queued on its sockets when it resumes, after their callers have timed out and
been told "nothing was charged". So each call carries, as its first argument, the server
time after which its caller has given up (80 % of the socket timeout, on an estimate of
Redis' clock kept from a ``TIME`` round trip every 30 s); a script that starts later
returns "expired" and changes nothing (the caller learns the clock from that reply and
tries once more). What remains: redis-py reconnects once on a dropped connection and
re-sends, so a reset *after* a write ran but before its reply could apply it twice
(``admit``, ``start_job`` and the releases are idempotent per job id; the usage and
service corrections of ``settle`` are not).

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

Every key expires by itself once it holds nothing live. Floats cross as ``%.17g`` strings
(a Lua number returned to Redis would be truncated to an integer). Single Redis (or a
primary with replicas, Sentinel, a managed service) only: ``all_overrides`` reads keys it
does not declare, so not Redis Cluster.

*Errors.* Connection errors, timeouts, a loading, read-only or out-of-memory Redis become
:class:`~gpu_backend.stores.usage.StoreUnavailable` at this boundary; the URL (it carries
the password) is never in a message. :mod:`gpu_backend.stores.resilient_store` decides
what a tier does then (``SPLITSPACE_REDIS_FAILURE``).

*Two faces, one definition.* :class:`_Commands` builds each call (keys, arguments, how to
read the reply) without I/O; :class:`RedisStore` (redis-py's blocking client, for the GPU
thread and the lease renewer) and :class:`AsyncRedisStore` (``redis.asyncio``, for the
event loop: ``admit``) only send them. Timeouts and retries:
``shared/config/redis_client.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

from splitspace.gpu_backend.stores.usage import (
    _SLACK,
    DEFAULT_SERVICE_TTL_S,
    AdmitGrant,
    AdmitPlan,
    Lease,
    Renewal,
    SlotCounts,
    SlotGrant,
    SlotKind,
    StoreUnavailable,
    check_plan,
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

T = TypeVar("T")
P = ParamSpec("P")

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

_SCRIPTS: dict[str, str] = {
    # KEYS[1] usage hash
    "usage": """
local h = redis.call('HMGET', KEYS[1], 'used', 'start', 'window_s')
local used, start, win = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
if not start or start + win <= NOW then return {'0', '0'} end
return {fmt(used), fmt(math.max(0, start + win - NOW))}
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
    # KEYS slot sets, one per lease, then the index; ARG[1] lease_s, ARG[i + 1] the job of KEYS[i]
    "slot_renew": """
local expires = fmt(NOW + tonumber(ARG[1]))
local out = {}
for i = 1, #KEYS - 1 do
  local k = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', fmt(NOW))
  if redis.call('ZSCORE', k, ARG[i + 1]) then
    redis.call('ZADD', k, 'XX', expires, ARG[i + 1]); touch(k)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
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
  if start and start + win > NOW then
    redis.call('HSET', KEYS[i], 'used', fmt(math.max(0, used + tonumber(ARG[i]))))
  end
end
return false
""",
    # Dispatch and charge (UsageStore.start_job): the queued lease becomes a running one
    # within the limit, then the flow's service and the virtual time are charged. KEYS
    # queued set, running set, the flow's service, the virtual time, the slot index; ARG
    # job, limit, lease_s, service delta, ttl in ms.
    "start_job": """
local job = ARG[1]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(NOW))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(NOW))
local held = redis.call('ZCARD', KEYS[2])
local already = redis.call('ZSCORE', KEYS[2], job)
if not already and held >= num(ARG[2]) then return {0, held} end
redis.call('ZADD', KEYS[2], fmt(NOW + tonumber(ARG[3])), job); touch(KEYS[2])
redis.call('ZREM', KEYS[1], job)
if not already then held = held + 1 end
local delta = tonumber(ARG[4])
local v = tonumber(redis.call('GET', KEYS[4]) or '0')
local s = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), v) + delta
redis.call('SET', KEYS[3], fmt(s), 'PX', ARG[5])
redis.call('SET', KEYS[4], fmt(math.max(v, s - delta)), 'PX', ARG[5])
return {1, held}
""",
}


# -- calls: built once, sent by either face -----------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(limit: float) -> str:
    """A limit for Lua: ``inf`` spelled out (``tonumber`` does not read it everywhere)."""
    return "inf" if math.isinf(limit) and limit > 0 else repr(float(limit))


def _float(value: float) -> str:
    return repr(float(value))


def _ms(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


def _none(reply: Any) -> None:
    return None


def _hash(reply: Any) -> dict[str, Any]:
    """A flat HGETALL reply (or a dict, under RESP3) of JSON values."""
    items = list(reply.items()) if isinstance(reply, dict) else list(zip(reply[0::2], reply[1::2], strict=False))
    return {_text(k): json.loads(_text(v)) for k, v in items}


def _admit_grant(wanted: list[str]) -> Callable[[Any], AdmitGrant]:
    def parse(reply: Any) -> AdmitGrant:
        tag = _text(reply[0])
        if tag == "ok":
            return AdmitGrant(
                True, service={f: float(v) for f, v in zip(wanted, reply[1], strict=False) if v is not None}
            )
        if tag == "rate":
            return AdmitGrant(False, "rate", held=int(reply[1]), retry_after_s=float(reply[2]))
        if tag == "queued":
            return AdmitGrant(False, "queued", held=int(reply[1]))
        if tag == "replay":
            return AdmitGrant(False, "replay")
        return AdmitGrant(False, "quota", quota=int(reply[1]) - 1, retry_after_s=float(reply[2]), used=float(reply[3]))

    return parse


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One script run: which script ('' when the answer needs no Redis), its keys and
    arguments, and how to read its reply."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    parse: Callable[[Any], T]


class _Commands:
    """Each store operation, with the protocol's signature, as a :class:`_Call` (no I/O)."""

    def __init__(self, prefix: str, service_ttl_s: float) -> None:
        if not service_ttl_s > 0:
            raise ValueError(f"service_ttl_s must be positive, got {service_ttl_s!r}")
        self.prefix = prefix
        self.service_ttl_ms = _ms(service_ttl_s)
        self._index = f"{prefix}overrides:index"
        self._version = f"{prefix}overrides:version"
        self._client_prefix = f"{prefix}overrides:c:"
        self._slot_index = f"{prefix}slot-index"
        self._usage_index = f"{prefix}usage-index"

    def _usage(self, key: str) -> str:
        return f"{self.prefix}usage:{key}"

    def _slot(self, kind: str, key: str) -> str:
        return f"{self.prefix}slot:{kind}:{key}"

    def _svc(self, flow_id: str) -> str:
        return f"{self.prefix}svc:{flow_id}"

    def admit(self, plan: AdmitPlan, now: float | None = None) -> _Call[AdmitGrant]:
        check_plan(plan)
        wanted = list(dict.fromkeys(plan.service))
        keys = (
            f"{self.prefix}rate:{plan.key}",
            self._slot("queued", plan.key),
            *(self._usage(r.key) for r in plan.reservations),
            *map(self._svc, wanted),
            f"{self.prefix}nonce:{plan.nonce}",
            self._usage_index,
            self._slot_index,
        )
        args = (
            plan.job_id,
            "" if plan.rate_limit is None else _num(plan.rate_limit),
            _float(plan.rate_window_s),
            _num(plan.max_queued),
            _float(plan.lease_s),
            str(len(plan.reservations)),
            repr(_SLACK),
            *(x for r in plan.reservations for x in (_float(r.amount), _num(r.limit), _float(r.window_s))),
            plan.nonce,
            _ms(plan.nonce_ttl_s),
        )
        return _Call("admit", keys, args, _admit_grant(wanted))

    def start_job(
        self,
        key: str,
        job_id: str,
        limit: float,
        lease_s: float,
        service_delta: float,
        vtime_key: str,
        now: float | None = None,
    ) -> _Call[SlotGrant]:
        check_slot("running", limit, lease_s)
        check_service(service_delta)
        keys = (
            self._slot("queued", key),
            self._slot("running", key),
            self._svc(key),
            self._svc(vtime_key),
            self._slot_index,
        )
        args = (job_id, _num(limit), _float(lease_s), _float(service_delta), self.service_ttl_ms)
        return _Call("start_job", keys, args, lambda r: SlotGrant(bool(int(r[0])), int(r[1])))

    def settle(
        self,
        key: str,
        job_id: str,
        adjustments: Iterable[tuple[str, float]] = (),
        *,
        forget_rate: bool = False,
        service_delta: float = 0.0,
        now: float | None = None,
    ) -> _Call[None]:
        check_service(service_delta)
        deltas = [(k, d) for k, d in adjustments if d]
        keys = (
            self._slot("queued", key),
            self._slot("running", key),
            f"{self.prefix}rate:{key}",
            self._svc(key),
            *(self._usage(k) for k, _ in deltas),
        )
        args = (
            job_id,
            "1" if forget_rate else "",
            _float(service_delta) if service_delta else "",
            self.service_ttl_ms,
            *(_float(d) for _, d in deltas),
        )
        return _Call("settle", keys, args, _none)

    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> _Call[Renewal]:
        wanted = list(leases)
        for lease in wanted:
            check_slot(lease.kind, 0, lease_s)

        def parse(reply: Any) -> Renewal:
            flags = [bool(int(x)) for x in reply or ()]
            return Renewal(
                tuple(lease for lease, ok in zip(wanted, flags, strict=True) if ok),
                tuple(lease for lease, ok in zip(wanted, flags, strict=True) if not ok),
            )

        keys = (*(self._slot(lease.kind, lease.key) for lease in wanted), self._slot_index)
        return _Call("slot_renew" if wanted else "", keys, (_float(lease_s), *(le.job_id for le in wanted)), parse)

    def usage(self, key: str, now: float | None = None) -> _Call[tuple[float, float]]:
        return _Call("usage", (self._usage(key),), (), lambda r: (float(r[0]), float(r[1])))

    def usage_keys(self, now: float | None = None) -> _Call[list[str]]:
        head = self._usage("")
        return _Call("usage_keys", (self._usage_index,), (), lambda r: sorted(_text(k).removeprefix(head) for k in r))

    def reset(self, key: str) -> _Call[None]:
        return _Call("delete", (self._usage(key),), (), _none)

    def count(self, kind: SlotKind, key: str, now: float | None = None) -> _Call[int]:
        check_slot(kind, 0, 1.0)
        return _Call("slot_count", (self._slot(kind, key),), (), int)

    def slot_counts(self, now: float | None = None) -> _Call[dict[str, SlotCounts]]:
        head = f"{self.prefix}slot:"

        def parse(reply: Any) -> dict[str, SlotCounts]:
            counts: dict[str, dict[str, int]] = {}
            for name, n in zip(reply[0::2], reply[1::2], strict=False):
                kind, _, key = _text(name).removeprefix(head).partition(":")
                counts.setdefault(key, {})[kind] = int(n)
            return {key: SlotCounts(**c) for key, c in counts.items()}

        return _Call("slot_counts", (self._slot_index,), (), parse)

    def set_overrides(self, client_id: str, values: dict[str, Any]) -> _Call[None]:
        pairs = [part for name, value in values.items() for part in (str(name), json.dumps(value))]
        keys = (self._client_prefix + client_id, self._index, self._version)
        return _Call("overrides_set", keys, (client_id, *pairs), _none)

    def clear_overrides(self, client_id: str) -> _Call[None]:
        keys = (self._client_prefix + client_id, self._index, self._version)
        return _Call("overrides_clear", keys, (client_id,), _none)

    def all_overrides(self) -> _Call[dict[str, dict[str, Any]]]:
        def parse(reply: Any) -> dict[str, dict[str, Any]]:
            return {_text(cid): _hash(values) for cid, values in zip(reply[0::2], reply[1::2], strict=False)}

        return _Call("overrides_all", (self._index,), (self._client_prefix,), parse)

    def overrides_version(self) -> _Call[int]:
        return _Call("overrides_version", (self._version,), (), int)


# -- sending them ------------------------------------------------------------------------

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


@dataclass(frozen=True)
class _Done(Generic[T]):
    value: T


_Ask = tuple[str, tuple[str, ...], list[str]] | None
"""What an exchange asks the client to send: a script run, or None for ``TIME``."""


@contextlib.contextmanager
def _boundary() -> Iterator[None]:
    """Redis errors that mean "cannot serve now" become :class:`StoreUnavailable` (its
    type and first line: never the URL)."""
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(unreachable_reason(exc)) from exc


class _Face:
    """What both faces share: the client, its scripts, the calls and Redis' clock. A call
    is an exchange (:meth:`_exchange`, no I/O) that each face drives with its client."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
        timeout_s: float | None = None,
    ) -> None:
        self._client = client
        self._cmd = _Commands(prefix, service_ttl_s)
        self._scripts = {name: client.register_script(_LUA_COMMON + src) for name, src in _SCRIPTS.items()}
        if timeout_s is None:  # a caller gives up at 80 % of its socket timeout, the rest a margin
            timeout_s = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._clock = _ServerClock(None if timeout_s is None else 0.8 * float(timeout_s))

    _connect: Callable[[str, float], Any]

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        prefix: str = DEFAULT_PREFIX,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
    ) -> Self:
        """A store on a new client for ``url`` (``redis://``, ``rediss://``, ``unix://``).
        Connects lazily: a tier starts while Redis is down."""
        return cls(cls._connect(url, timeout_s), prefix=prefix, service_ttl_s=service_ttl_s, timeout_s=timeout_s)

    def _exchange(self, call: _Call[T]) -> Generator[_Ask | _Done[T], Any, None]:
        """Yields what to send, is sent each reply; yields :class:`_Done` last. A second
        try after learning the clock from an "expired" reply."""
        if not call.script:
            yield _Done(call.parse(None))
            return
        for _ in range(2):
            if self._clock.stale:
                sent = time.monotonic()
                seconds, micros = yield None
                self._clock.learn(seconds + micros / 1e6, sent, time.monotonic())
            sent = time.monotonic()
            reply = yield call.script, call.keys, [self._clock.deadline(), *call.args]
            server_s = _expired_at(reply)
            if server_s is None:
                yield _Done(call.parse(reply))
                return
            self._clock.learn(server_s, sent, time.monotonic())
        raise StoreUnavailable("the shared store (Redis) answered too late twice (its clock jumped?)")

    def _send(self, ask: _Ask) -> Any:
        """The reply to ``ask`` (an awaitable on the asyncio client)."""
        return self._client.time() if ask is None else self._scripts[ask[0]](keys=list(ask[1]), args=ask[2])


def _sync(build: Callable[Concatenate[_Commands, P], _Call[T]]) -> Callable[Concatenate[RedisStore, P], T]:
    def run(self: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(build(self._cmd, *args, **kwargs))

    return run


def _async(
    build: Callable[Concatenate[_Commands, P], _Call[T]],
) -> Callable[Concatenate[AsyncRedisStore, P], Awaitable[T]]:
    async def run(self: AsyncRedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(build(self._cmd, *args, **kwargs))

    return run


class RedisStore(_Face):
    """A :class:`~gpu_backend.stores.usage.UsageStore` on Redis, for threads (blocking
    client). ``now`` arguments are accepted for the protocol and ignored."""

    _connect = staticmethod(sync_client)

    def _run(self, call: _Call[T]) -> T:
        steps, reply = self._exchange(call), None
        with _boundary():
            while not isinstance(ask := steps.send(reply), _Done):
                reply = self._send(ask)
        return ask.value

    admit, start_job, settle = _sync(_Commands.admit), _sync(_Commands.start_job), _sync(_Commands.settle)
    renew, count, slot_counts = _sync(_Commands.renew), _sync(_Commands.count), _sync(_Commands.slot_counts)
    usage, usage_keys, reset = _sync(_Commands.usage), _sync(_Commands.usage_keys), _sync(_Commands.reset)
    set_overrides, clear_overrides = _sync(_Commands.set_overrides), _sync(_Commands.clear_overrides)
    all_overrides, overrides_version = _sync(_Commands.all_overrides), _sync(_Commands.overrides_version)

    def close(self) -> None:
        self._client.close()


class AsyncRedisStore(_Face):
    """The event loop's face (``redis.asyncio``): the calls admission makes there, as
    coroutines; every other call of a job runs on a thread (:class:`RedisStore`)."""

    _connect = staticmethod(async_client)

    async def _run(self, call: _Call[T]) -> T:
        steps, reply = self._exchange(call), None
        with _boundary():
            while not isinstance(ask := steps.send(reply), _Done):
                reply = await self._send(ask)
        return ask.value

    admit = _async(_Commands.admit)

    async def close(self) -> None:
        await self._client.aclose()
