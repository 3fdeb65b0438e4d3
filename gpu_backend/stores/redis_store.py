"""The usage store on Redis: one state for any number of GPU tiers (``SPLITSPACE_REDIS_URL``).

Why: replicas counting alone multiply every limit by their number. Each call is one Lua
script, checks and changes in one step no other client interleaves, timed by Redis'
``TIME``. A call carries the server time after which its caller gave up (``ARGV[1]``, from
a clock estimate resynced every 30 s), so a paused Redis never runs a timed-out call
later. Keys under ``prefix``: ``usage:{key}`` hash (used, start, window_s) and the
``usage-index`` zset; ``overrides:c:{client}`` hash of JSON values, ``overrides:index`` set,
``overrides:version``; ``slot:{queued|running}:{key}`` zset of job by lease expiry and the
``slot-index`` zset; ``rate:{key}`` zset of job by admission time; ``svc:{flow}`` service;
``nonce:{nonce}`` the job admitted with it. Every key expires once it holds nothing live.
Not Redis Cluster (``all_overrides`` reads undeclared keys). Design: docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast

import redis
import redis.asyncio

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
from splitspace.shared.contract.quotas import OverrideValues

T = TypeVar("T")
P = ParamSpec("P")
_RESYNC_S = 30.0

_LUA_COMMON = """
local t = redis.call('TIME')
local NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(s) if s == 'inf' then return math.huge end return tonumber(s) end
local function fmt(x) return string.format('%.17g', x) end
local function ms(x) return string.format('%d', math.ceil(x * 1000) + 1) end
local function touch(k)  -- the set expires with its last lease; KEYS[#KEYS] indexes live sets
  local top = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  if top[2] then
    redis.call('PEXPIREAT', k, ms(tonumber(top[2])))
    redis.call('ZADD', KEYS[#KEYS], 'GT', top[2], k)
  end
end
local function live(k)  -- a usage hash's live window, or nil
  local h = redis.call('HMGET', k, 'used', 'start', 'window_s')
  local w = {tonumber(h[1]), tonumber(h[2]), tonumber(h[3])}
  if w[2] and w[2] + w[3] > NOW then return w end
end
local function get(k) return tonumber(redis.call('GET', k) or '0') end
if ARGV[1] ~= '' and NOW > tonumber(ARGV[1]) then return {'__expired__', fmt(NOW)} end
local ARG = {}
for i = 2, #ARGV do ARG[i - 1] = ARGV[i] end
"""

_SCRIPTS: dict[str, str] = {
    "usage": """
local w = live(KEYS[1])
if not w then return {'0', '0'} end
return {fmt(w[1]), fmt(math.max(0, w[2] + w[3] - NOW))}
""",
    "usage_keys": """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(NOW))
local out = {}
for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', k) == 1 then out[#out + 1] = k else redis.call('ZREM', KEYS[1], k) end
end
return out
""",
    "delete": "redis.call('DEL', KEYS[1]) return false",
    # KEYS client hash, index, version; ARG client_id, then field, json pairs ('clear': none)
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
    "overrides_all": """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = id; out[#out + 1] = redis.call('HGETALL', ARG[1] .. id)
end
return out
""",
    "overrides_version": "return get(KEYS[1])",
    # KEYS one slot set per lease, then the index; ARG lease_s, then the job of each
    "slot_renew": """
local out = {}
for i = 1, #KEYS - 1 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', fmt(NOW))
  out[i] = redis.call('ZSCORE', KEYS[i], ARG[i + 1]) and 1 or 0
  if out[i] == 1 then redis.call('ZADD', KEYS[i], 'XX', fmt(NOW + tonumber(ARG[1])), ARG[i + 1]); touch(KEYS[i]) end
end
return out
""",
    "slot_count": "return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(NOW), '+inf')",
    "slot_counts": """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(NOW))
local out = {}
for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local n = redis.call('ZCOUNT', k, '(' .. fmt(NOW), '+inf')
  if n > 0 then out[#out + 1] = k; out[#out + 1] = n end
end
return out
""",
    # KEYS rate set, queued set, a usage hash per reservation, the service counters to read,
    # the nonce, the usage index, the slot index; ARG job, rate limit ('' none), rate
    # window_s, max_queued, lease_s, reservations, slack, amount/limit/window_s of each,
    # nonce ('' none), its ttl in ms. Every check first, then every change.
    "admit": """
local job, nres, slack = ARG[1], tonumber(ARG[6]), tonumber(ARG[7])
if ARG[8 + 3 * nres] ~= '' and not redis.call('SET', KEYS[#KEYS - 2], job, 'NX', 'PX', ARG[9 + 3 * nres])
    and redis.call('GET', KEYS[#KEYS - 2]) ~= job then
  return {'replay'}
end
local new_rate = false
if ARG[2] ~= '' then
  local w = tonumber(ARG[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(NOW - w))
  local held = redis.call('ZCARD', KEYS[1])
  new_rate = not redis.call('ZSCORE', KEYS[1], job)
  if new_rate and held >= num(ARG[2]) then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {'rate', held, fmt(held == 0 and w or math.max(0, tonumber(oldest[2]) + w - NOW))}
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(NOW))
local held = redis.call('ZCARD', KEYS[2])
if not redis.call('ZSCORE', KEYS[2], job) and held >= num(ARG[4]) then return {'queued', held} end
local windows = {}
for i = 1, nres do
  local k, a = KEYS[2 + i], 7 + 3 * (i - 1)
  local amount, limit = tonumber(ARG[a + 1]), num(ARG[a + 2])
  local w = windows[k] or live(k) or {0, NOW, tonumber(ARG[a + 3])}
  if w[1] + amount > limit + slack then return {'quota', i, fmt(math.max(0, w[2] + w[3] - NOW)), fmt(w[1])} end
  windows[k] = {w[1] + amount, w[2], w[3]}
end
if new_rate then redis.call('ZADD', KEYS[1], fmt(NOW), job); redis.call('PEXPIRE', KEYS[1], ms(tonumber(ARG[3]))) end
redis.call('ZADD', KEYS[2], fmt(NOW + tonumber(ARG[5])), job); touch(KEYS[2])
for k, w in pairs(windows) do
  redis.call('HSET', k, 'used', fmt(w[1]), 'start', fmt(w[2]), 'window_s', fmt(w[3]))
  redis.call('PEXPIREAT', k, ms(w[2] + w[3]))
  redis.call('ZADD', KEYS[#KEYS - 1], 'GT', fmt(w[2] + w[3]), k)
end
local svc = {}
for i = 3 + nres, #KEYS - 3 do svc[#svc + 1] = redis.call('GET', KEYS[i]) end
return {'ok', svc}
""",
    # KEYS queued set, running set, rate set, the flow's service, a usage hash per delta;
    # ARG job, '1' to forget its rate entry, service delta ('' none), ttl in ms, the deltas
    "settle": """
redis.call('ZREM', KEYS[1], ARG[1])
redis.call('ZREM', KEYS[2], ARG[1])
if ARG[2] == '1' then redis.call('ZREM', KEYS[3], ARG[1]) end
if ARG[3] ~= '' then redis.call('SET', KEYS[4], fmt(get(KEYS[4]) + tonumber(ARG[3])), 'PX', ARG[4]) end
for i = 5, #KEYS do
  local w = live(KEYS[i])
  if w then redis.call('HSET', KEYS[i], 'used', fmt(math.max(0, w[1] + tonumber(ARG[i])))) end
end
return false
""",
    # KEYS queued set, running set, the flow's service, the virtual time, the slot index;
    # ARG job, limit, lease_s, service delta, ttl in ms
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
local delta, v = tonumber(ARG[4]), get(KEYS[4])
local s = math.max(get(KEYS[3]), v) + delta
redis.call('SET', KEYS[3], fmt(s), 'PX', ARG[5])
redis.call('SET', KEYS[4], fmt(math.max(v, s - delta)), 'PX', ARG[5])
return {1, held}
""",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(limit: float) -> str:
    return "inf" if math.isinf(limit) and limit > 0 else repr(float(limit))


def _ms(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


def _none(reply: Any) -> None:
    return None


def _hash(reply: Any) -> dict[str, Any]:
    items = list(reply.items()) if isinstance(reply, dict) else list(zip(reply[0::2], reply[1::2], strict=False))
    return {_text(k): json.loads(_text(v)) for k, v in items}


def _admit_grant(wanted: list[str]) -> Callable[[Any], AdmitGrant]:
    def parse(reply: Any) -> AdmitGrant:
        tag = _text(reply[0])
        if tag == "ok":
            read = zip(wanted, reply[1], strict=False)
            return AdmitGrant(True, service={flow: float(v) for flow, v in read if v is not None})
        if tag in ("queued", "replay"):
            return AdmitGrant(False, tag, held=int(reply[1]) if tag == "queued" else 0)
        if tag == "rate":
            return AdmitGrant(False, "rate", held=int(reply[1]), retry_after_s=float(reply[2]))
        return AdmitGrant(False, "quota", quota=int(reply[1]) - 1, retry_after_s=float(reply[2]), used=float(reply[3]))

    return parse


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One script run ('' when the answer needs no Redis) and how to read its reply."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    parse: Callable[[Any], T]


@dataclass(frozen=True)
class _Done(Generic[T]):
    value: T


_Ask = tuple[str, tuple[str, ...], list[str]] | None
"""What an exchange asks the client to send: a script run, or None for ``TIME``."""


@contextlib.contextmanager
def _boundary() -> Iterator[None]:
    """Redis errors that mean "cannot serve now" become StoreUnavailable (never the URL)."""
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(unreachable_reason(exc), 1.0) from exc


def _sync(build: Callable[Concatenate[RedisStore, P], _Call[T]]) -> Callable[Concatenate[RedisStore, P], T]:
    def run(self: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        steps, reply = self._exchange(build(self, *args, **kwargs)), None
        with _boundary():
            while not isinstance(ask := steps.send(reply), _Done):
                reply = self._client.time() if ask is None else self._scripts[ask[0]](keys=list(ask[1]), args=ask[2])
        return ask.value

    return run


def _async(
    build: Callable[Concatenate[RedisStore, P], _Call[T]],
) -> Callable[Concatenate[RedisStore, P], Awaitable[T]]:
    async def run(self: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        steps, reply = self._exchange(build(self, *args, **kwargs)), None
        with _boundary():
            while not isinstance(ask := steps.send(reply), _Done):
                client, scripts = self._async_client, self._async_scripts
                reply = await (client.time() if ask is None else scripts[ask[0]](keys=list(ask[1]), args=ask[2]))
        return ask.value

    return run


class RedisStore:
    """The usage store on Redis: a blocking client for threads and a ``redis.asyncio`` one
    for the event loop's :meth:`admit_async`. ``now`` is ignored."""

    def __init__(
        self,
        client: redis.Redis,
        async_client: redis.asyncio.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
        timeout_s: float | None = None,
    ) -> None:
        self._client, self._async_client = client, async_client
        if not service_ttl_s > 0:
            raise ValueError(f"service_ttl_s must be positive, got {service_ttl_s!r}")
        self.prefix, self.ttl_ms = prefix, _ms(service_ttl_s)
        self._overrides = (f"{prefix}overrides:index", f"{prefix}overrides:version")
        self._slot_index = f"{prefix}slot-index"
        self._scripts = {name: client.register_script(_LUA_COMMON + src) for name, src in _SCRIPTS.items()}
        self._async_scripts = {name: async_client.register_script(_LUA_COMMON + src) for name, src in _SCRIPTS.items()}
        if timeout_s is None:  # a caller gives up at 80 % of its socket timeout, the rest a margin
            timeout_s = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._give_up_s = None if timeout_s is None else 0.8 * float(timeout_s)
        self._offset, self._synced_at = 0.0, -math.inf  # Redis' TIME - time.monotonic(), learnt then

    def _learn(self, server_s: float, sent: float) -> None:
        received = time.monotonic()
        self._offset, self._synced_at = server_s - (sent + received) / 2, received

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        prefix: str = DEFAULT_PREFIX,
        service_ttl_s: float = DEFAULT_SERVICE_TTL_S,
    ) -> RedisStore:
        """Both clients for ``url``; they connect lazily (a tier starts while Redis is down)."""
        clients = (sync_client(url, timeout_s), async_client(url, timeout_s))
        return cls(*clients, prefix=prefix, service_ttl_s=service_ttl_s, timeout_s=timeout_s)

    def _exchange(self, call: _Call[T]) -> Generator[_Ask | _Done[T], Any, None]:
        """Yields what to send and is sent each reply, :class:`_Done` last. The call carries
        the server time its caller gives up at, on Redis' clock as estimated from a ``TIME``
        round trip every 30 s; it tries again once after learning the clock from an
        "expired" reply."""
        if not call.script:
            yield _Done(call.parse(None))
            return
        for _ in range(2):
            if self._give_up_s is not None and time.monotonic() - self._synced_at > _RESYNC_S:
                sent = time.monotonic()
                seconds, micros = yield None
                self._learn(seconds + micros / 1e6, sent)
            sent = time.monotonic()
            deadline = "" if self._give_up_s is None else repr(sent + self._offset + self._give_up_s)
            reply = yield call.script, call.keys, [deadline, *call.args]
            if not (isinstance(reply, list) and len(reply) == 2 and _text(reply[0]) == "__expired__"):
                yield _Done(call.parse(reply))
                return
            self._learn(float(reply[1]), sent)
        raise StoreUnavailable("the shared store (Redis) answered too late twice (its clock jumped?)", 1.0)

    def _usage(self, key: str) -> str:
        return f"{self.prefix}usage:{key}"

    def _slot(self, kind: str, key: str) -> str:
        return f"{self.prefix}slot:{kind}:{key}"

    def _svc(self, flow_id: str) -> str:
        return f"{self.prefix}svc:{flow_id}"

    def _admit(self, plan: AdmitPlan, now: float | None = None) -> _Call[AdmitGrant]:
        check_plan(plan)
        wanted = list(dict.fromkeys(plan.service))
        keys = (
            f"{self.prefix}rate:{plan.key}",
            self._slot("queued", plan.key),
            *(self._usage(r.key) for r in plan.reservations),
            *map(self._svc, wanted),
            f"{self.prefix}nonce:{plan.nonce}",
            f"{self.prefix}usage-index",
            self._slot_index,
        )
        args = (
            plan.job_id,
            "" if plan.rate_limit is None else _num(plan.rate_limit),
            repr(float(plan.rate_window_s)),
            _num(plan.max_queued),
            repr(float(plan.lease_s)),
            str(len(plan.reservations)),
            repr(_SLACK),
            *(x for r in plan.reservations for x in (repr(float(r.amount)), _num(r.limit), repr(float(r.window_s)))),
            plan.nonce,
            _ms(plan.nonce_ttl_s),
        )
        return _Call("admit", keys, args, _admit_grant(wanted))

    admit, admit_async = _sync(_admit), _async(_admit)

    @_sync
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
        slots = (self._slot("queued", key), self._slot("running", key))
        keys = (*slots, self._svc(key), self._svc(vtime_key), self._slot_index)
        args = (job_id, _num(limit), repr(float(lease_s)), repr(float(service_delta)), self.ttl_ms)
        return _Call("start_job", keys, args, lambda r: SlotGrant(bool(int(r[0])), int(r[1])))

    @_sync
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
        slots = (self._slot("queued", key), self._slot("running", key), f"{self.prefix}rate:{key}")
        keys = (*slots, self._svc(key), *(self._usage(k) for k, _ in deltas))
        svc = repr(float(service_delta)) if service_delta else ""
        args = (job_id, "1" if forget_rate else "", svc, self.ttl_ms, *(repr(float(d)) for _, d in deltas))
        return _Call("settle", keys, args, _none)

    @_sync
    def renew(self, leases: Iterable[Lease], lease_s: float, now: float | None = None) -> _Call[Renewal]:
        wanted = list(leases)
        for lease in wanted:
            check_slot(lease.kind, 0, lease_s)

        def parse(reply: Any) -> Renewal:
            flags = [bool(int(x)) for x in reply or ()]
            pairs = list(zip(wanted, flags, strict=True))
            return Renewal(tuple(le for le, ok in pairs if ok), tuple(le for le, ok in pairs if not ok))

        keys = (*(self._slot(lease.kind, lease.key) for lease in wanted), self._slot_index)
        args = (repr(float(lease_s)), *(le.job_id for le in wanted))
        return _Call("slot_renew" if wanted else "", keys, args, parse)

    @_sync
    def usage(self, key: str, now: float | None = None) -> _Call[tuple[float, float]]:
        return _Call("usage", (self._usage(key),), (), lambda r: (float(r[0]), float(r[1])))

    @_sync
    def usage_keys(self, now: float | None = None) -> _Call[list[str]]:
        head = self._usage("")
        parse: Callable[[Any], list[str]] = lambda r: sorted(_text(k).removeprefix(head) for k in r)  # noqa: E731
        return _Call("usage_keys", (f"{self.prefix}usage-index",), (), parse)

    @_sync
    def reset(self, key: str) -> _Call[None]:
        return _Call("delete", (self._usage(key),), (), _none)

    @_sync
    def count(self, kind: SlotKind, key: str, now: float | None = None) -> _Call[int]:
        check_slot(kind, 0, 1.0)
        return _Call("slot_count", (self._slot(kind, key),), (), int)

    @_sync
    def slot_counts(self, now: float | None = None) -> _Call[dict[str, SlotCounts]]:
        head = f"{self.prefix}slot:"

        def parse(reply: Any) -> dict[str, SlotCounts]:
            counts: dict[str, dict[str, int]] = {}
            for name, n in zip(reply[0::2], reply[1::2], strict=False):
                kind, _, key = _text(name).removeprefix(head).partition(":")
                counts.setdefault(key, {})[kind] = int(n)
            return {key: SlotCounts(**c) for key, c in counts.items()}

        return _Call("slot_counts", (self._slot_index,), (), parse)

    @_sync
    def set_overrides(self, client_id: str, values: OverrideValues) -> _Call[None]:
        pairs = [part for name, value in values.items() for part in (str(name), json.dumps(value))]
        keys = (f"{self.prefix}overrides:c:{client_id}", *self._overrides)
        return _Call("overrides_set", keys, (client_id, *pairs), _none)

    @_sync
    def clear_overrides(self, client_id: str) -> _Call[None]:
        keys = (f"{self.prefix}overrides:c:{client_id}", *self._overrides)
        return _Call("overrides_clear", keys, (client_id,), _none)

    @_sync
    def all_overrides(self) -> _Call[dict[str, OverrideValues]]:
        def parse(reply: Any) -> dict[str, OverrideValues]:
            # each hash holds what set_overrides wrote: checked values, one JSON text a field
            pairs = zip(reply[0::2], reply[1::2], strict=False)
            return {_text(cid): cast(OverrideValues, _hash(values)) for cid, values in pairs}

        return _Call("overrides_all", self._overrides[:1], (f"{self.prefix}overrides:c:",), parse)

    @_sync
    def overrides_version(self) -> _Call[int]:
        return _Call("overrides_version", self._overrides[1:], (), int)

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        """Close the event loop's client (on that loop)."""
        await self._async_client.aclose()
