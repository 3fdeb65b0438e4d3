"""Webhooks of ended jobs, the Standard Webhooks way, delivered off every job's path.

Why it exists: a batch that submitted thousands of jobs wants to hear when each ends,
not to poll. Each message is signed as Standard Webhooks says (https://www.standardwebhooks.com):
headers ``webhook-id`` (the same on every attempt of one message), ``webhook-timestamp``
(unix seconds of the attempt) and ``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of
``id.timestamp.body`` under the client's ``webhook_secret``, ``whsec_...`` in the quota
file's ``[[keys]]``), made by the ``standardwebhooks`` library; any Standard Webhooks
verifier (the library itself, the ``openai`` SDK's ``client.webhooks.unwrap``, Svix's)
checks them.

The body: ``{"id", "object": "event", "type": "job.completed" | "job.failed" |
"job.cancelled" | "job.started", "created_at", "timestamp", "data": <the job as GET
/v1/jobs/{id} shows it>}``. ``started`` (opt-in) is sent when the GPU tier says the job
runs, or, for a job too quick for that word, just before its end. Messages are not
ordered (each is its own delivery); ``data.status`` and ``type`` say which is which.

Delivery (:class:`Deliveries`): a message is stored (``JobStore.put_delivery``) before it
is first tried, so a restart loses none; a fixed set of ``workers`` coroutines sends the
messages that are due, in their own loop, so a slow or hanging receiver holds one worker
for at most 5 s (connect 2 s) and never a job. A message that is not answered with a 2xx
is tried again after :func:`backoff_s` (5 s, then three times longer each time, at most
an hour apart; 12 attempts in all by default: about 5.5 hours), then given up. Each
attempt's outcome is recorded on the job (``webhook_attempts``). Targets are checked by
``safe_target.py`` at every connection; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
from standardwebhooks import Webhook

from splitspace.cpu_frontend.jobs.records import Attempt, Delivery, new_id
from splitspace.cpu_frontend.jobs.safe_target import Networks, SafeResolver, address_problem, literal_ip, split_url
from splitspace.cpu_frontend.jobs.store import JobStore

log = logging.getLogger("splitspace.webhooks")

CONNECT_TIMEOUT_S = 2.0
TOTAL_TIMEOUT_S = 5.0
MAX_DELAY_S = 3600.0
GROWTH = 3.0
JITTER = 0.1
USER_AGENT = "splitspace-webhooks/1"


def backoff_s(failed: int, first_s: float, *, rand: Callable[[], float] = random.random) -> float:
    """The wait before the next attempt after ``failed`` failed ones (1, 2, ...):
    ``first_s * 3**(failed-1)``, at most an hour, plus up to 10% jitter (receivers that
    failed together are not all retried in the same second)."""
    base = min(MAX_DELAY_S, first_s * GROWTH ** max(0, failed - 1))
    return base * (1.0 + JITTER * rand())


def schedule(first_s: float, attempts: int) -> list[float]:
    """The waits between ``attempts`` attempts, without jitter (for the docs and the tests)."""
    return [backoff_s(n, first_s, rand=lambda: 0.0) for n in range(1, attempts)]


def event_body(event: str, job: dict[str, Any], now: float) -> str:
    """The message for ``job.<event>``; ``job`` as the API shows it."""
    return json.dumps(
        {
            "id": new_id("evt_", now),
            "object": "event",
            "type": f"job.{event}",
            "created_at": int(now),
            "timestamp": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
            "data": job,
        },
        separators=(",", ":"),
    )


def signed_headers(secret: str, webhook_id: str, timestamp: float, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt."""
    when = datetime.fromtimestamp(int(timestamp), UTC)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": Webhook(secret).sign(webhook_id, when, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


class Sender:
    """POSTs one message: to checked addresses only, no redirects, short timeouts."""

    def __init__(
        self,
        allow: Networks = (),
        *,
        connections: int = 32,
        connect_s: float = CONNECT_TIMEOUT_S,
        total_s: float = TOTAL_TIMEOUT_S,
    ) -> None:
        self.allow = list(allow)
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=total_s, sock_connect=connect_s, connect=connect_s)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=SafeResolver(self.allow), use_dns_cache=False, limit=self._connections, limit_per_host=0
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=False, auto_decompress=False
            )
        return self._session

    async def send(self, url: str, headers: dict[str, str], body: str) -> tuple[int | None, str | None]:
        """(HTTP status, None) when the receiver answered; (None, why) when it did not."""
        try:
            _, host, _ = split_url(url)
        except ValueError as exc:
            return None, f"bad URL: {exc}"
        ip = literal_ip(host)  # (aiohttp resolves names through SafeResolver, but not literal addresses)
        problem = None if ip is None else address_problem(ip, self.allow)
        if problem:
            return None, f"refused: {problem}"
        try:
            async with self._open().post(url, data=body.encode(), headers=headers, allow_redirects=False) as r:
                return r.status, None
        except TimeoutError:
            return None, "timed out"
        except aiohttp.ClientConnectorError as exc:
            return None, f"could not connect: {exc.os_error.strerror or exc.os_error}"[:200]
        except aiohttp.ClientError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:200]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Deliveries:
    """The pending messages of this frontend, sent by ``workers`` coroutines as they fall due."""

    def __init__(
        self,
        store: JobStore,
        runner: str,
        secret_of: Callable[[str], str | None],
        sender: Sender,
        *,
        first_s: float = 5.0,
        max_attempts: int = 12,
        workers: int = 32,
        ttl_s: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.runner = runner
        self.secret_of = secret_of
        self.sender = sender
        self.first_s = first_s
        self.max_attempts = max_attempts
        self.ttl_s = ttl_s
        self._clock = clock
        self._workers = workers
        self._heap: list[tuple[float, int, Delivery]] = []
        self._order = itertools.count()
        self._ready: asyncio.Queue[Delivery] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.pending: set[str] = set()
        """Ids of the messages this frontend holds (due or waiting for a retry)."""

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._schedule())]
        self._tasks += [asyncio.create_task(self._work()) for _ in range(self._workers)]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.sender.aclose()

    async def add(self, job_id: str, owner: str, url: str, event: str, body: str) -> None:
        """A new message: stored, then due at once."""
        delivery = Delivery(new_id("msg_"), job_id, owner, url, event, body, 0, self._clock())
        await self.store.put_delivery(delivery, self.runner)
        self.take(delivery)

    def take(self, delivery: Delivery) -> None:
        """Hold this stored message and send it when due (new, adopted or reloaded)."""
        if delivery.id in self.pending:
            return
        self.pending.add(delivery.id)
        heapq.heappush(self._heap, (delivery.next_at, next(self._order), delivery))
        self._wake.set()

    async def _schedule(self) -> None:
        while True:
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                self._ready.put_nowait(heapq.heappop(self._heap)[2])
            wait = None if not self._heap else self._heap[0][0] - now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _work(self) -> None:
        while True:
            delivery = await self._ready.get()
            try:
                await self._attempt(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store failed: try again shortly, nothing is lost
                log.warning("webhook %s: could not record an attempt (%s); retrying", delivery.id, type(exc).__name__)
                self.pending.discard(delivery.id)
                self.take(replace(delivery, next_at=self._clock() + self.first_s))

    async def _attempt(self, delivery: Delivery) -> None:
        attempt = delivery.attempts + 1
        at = self._clock()
        secret = self.secret_of(delivery.owner)
        error: str | None
        if secret is None:
            status, error = None, "no webhook_secret for this client in the quota file"
        else:
            status, error = await self.sender.send(
                delivery.url, signed_headers(secret, delivery.id, at, delivery.body), delivery.body
            )
        ok = status is not None and 200 <= status < 300
        if status is not None and not ok:
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        next_at = None if ok or attempt >= self.max_attempts else self._clock() + backoff_s(attempt, self.first_s)
        await self.store.add_attempt(
            delivery.job_id, Attempt(delivery.id, delivery.event, attempt, at, ok, status, error, next_at), self.ttl_s
        )
        self.pending.discard(delivery.id)
        if next_at is None:
            await self.store.drop_delivery(delivery.id)
            if not ok:
                log.info("webhook %s of %s given up after %d attempts", delivery.id, delivery.job_id, attempt)
            return
        retry = replace(delivery, attempts=attempt, next_at=next_at)
        await self.store.put_delivery(retry, self.runner)
        self.take(retry)
