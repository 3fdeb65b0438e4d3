"""Several GPU tiers behind one frontend: least outstanding work, health checks, retry.

Each request goes to a healthy backend with the fewest calls in flight. A
backend that fails a call or its health check stops receiving work until a
health check passes again. A call that failed before the backend accepted it
(``NotStarted``) is retried on another backend; one that had started fails
with the clear "GPU backend unavailable" error. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from splitspace.cpu_frontend.hop.transport import NotStarted, Transport
from splitspace.shared.contract.calls import Call
from splitspace.shared.contract.errors import BackendUnavailable
from splitspace.shared.contract.hop import CallUpdate

U = TypeVar("U")

log = logging.getLogger("splitspace.frontend")


@dataclass
class Backend:
    transport: Transport
    healthy: bool = True
    outstanding: int = 0
    last_health: dict[str, Any] | None = None


class BackendPool:
    def __init__(
        self,
        transports: Sequence[Transport],
        *,
        health_interval_s: float = 2.0,
        health_headers: Callable[[], dict[str, str]] = dict,
        on_health: Callable[[dict[str, Any]], None] = lambda doc: None,
    ) -> None:
        if not transports:
            raise ValueError("at least one GPU backend URL is needed")
        self.backends = [Backend(t) for t in transports]
        self.health_interval_s = health_interval_s
        self._health_headers = health_headers
        self._on_health = on_health
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._health_loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for b in self.backends:
            await b.transport.aclose()

    async def _check(self, backend: Backend) -> None:
        try:
            backend.last_health = await backend.transport.health(self._health_headers())
            self._on_health(backend.last_health)
        except BackendUnavailable:
            if backend.healthy:
                log.warning("GPU backend %s is down", backend.transport.base_url)
            backend.healthy = False
            return
        if not backend.healthy:
            log.info("GPU backend %s is back", backend.transport.base_url)
        backend.healthy = True

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self.backends))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_all()

    def health(self) -> dict[str, Any] | None:
        """The latest health document of any healthy backend (model, defaults)."""
        for b in self.backends:
            if b.healthy and b.last_health:
                return b.last_health
        return next((b.last_health for b in self.backends if b.last_health), None)

    def _pick(self, tried: set[int]) -> Backend | None:
        candidates = [b for b in self.backends if id(b) not in tried]
        healthy = [b for b in candidates if b.healthy]
        pool = healthy or candidates  # none healthy: try anyway, it may just have come back
        return min(pool, key=lambda b: b.outstanding) if pool else None

    def call(self, call: Call, headers: Mapping[str, str]) -> AsyncGenerator[CallUpdate, None]:
        """A call of a developer's function: its updates from the first backend that takes it."""
        return self._first_taker(lambda t: t.call(call, headers))

    async def _first_taker(self, start: Callable[[Transport], AsyncGenerator[U, None]]) -> AsyncGenerator[U, None]:
        tried: set[int] = set()
        while True:
            backend = self._next(tried)
            backend.outstanding += 1
            try:
                updates = start(backend.transport)
                async with contextlib.aclosing(updates):  # closing us closes the call now
                    async for update in updates:
                        yield update
                return
            except NotStarted as exc:
                self._not_started(backend, exc)
            except BackendUnavailable:
                backend.healthy = False
                raise
            finally:
                backend.outstanding -= 1

    async def standing(self, headers: Mapping[str, str]) -> dict[str, Any]:
        tried: set[int] = set()
        while True:
            backend = self._next(tried)
            try:
                return await backend.transport.standing(headers)
            except NotStarted as exc:
                self._not_started(backend, exc)
            except BackendUnavailable:
                backend.healthy = False
                raise

    def _next(self, tried: set[int]) -> Backend:
        backend = self._pick(tried)
        if backend is None:
            raise BackendUnavailable("no GPU tier is reachable; try again shortly")
        tried.add(id(backend))
        return backend

    def _not_started(self, backend: Backend, exc: NotStarted) -> None:
        backend.healthy = False
        log.warning("GPU backend %s refused a call (%s); trying another", backend.transport.base_url, exc)
