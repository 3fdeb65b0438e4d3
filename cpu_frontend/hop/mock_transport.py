"""A transport that calls a Python function instead of a GPU tier (as httpx ships ``MockTransport``).

For tests of the frontend and for trying it without a GPU tier: the handler
receives the validated request and the call's headers and returns (or
yields) the updates the GPU tier would send, or raises the project's errors,
which reach the caller exactly as a real transport's would::

    async def handler(request, headers):
        yield Status("queued", position=1, eta_s=0.5)
        yield Result(png_bytes, info)

    frontend = build_app(settings, transports=[MockTransport(handler)])
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from typing import Any, cast

from splitspace.cpu_frontend.hop.transport import Transport
from splitspace.shared.contract.calls import Call
from splitspace.shared.contract.hop import CallUpdate, Update
from splitspace.shared.contract.schema import GenerateRequest

Handler = Callable[[GenerateRequest, Mapping[str, str]], "Iterable[Update] | AsyncIterator[Update]"]
CallHandler = Callable[[Call, Mapping[str, str]], "Iterable[CallUpdate] | AsyncIterator[CallUpdate]"]


class MockTransport(Transport):
    def __init__(
        self,
        handler: Handler,
        *,
        base_url: str = "mock://gpu-tier",
        standing: Callable[[Mapping[str, str]], dict[str, Any]] | None = None,
        health: dict[str, Any] | None = None,
        call_handler: CallHandler | None = None,
    ) -> None:
        self.base_url = base_url
        self._handler = handler
        self._call_handler = call_handler
        self._standing = standing or (lambda headers: {"tier": "anonymous", "queued": 0, "running": 0})
        self._health = health or {"status": "ok", "model": "mock", "placeholder_model": True,
                                  "defaults": {"steps": 1, "guidance_scale": 0.0}}
        self.calls: list[tuple[GenerateRequest, dict[str, str]]] = []
        """Every call's request and headers, in order."""

    async def stream(self, request: GenerateRequest, headers: Mapping[str, str]) -> AsyncGenerator[Update, None]:
        self.calls.append((request, dict(headers)))
        updates = self._handler(request, headers)
        if inspect.isasyncgen(updates):
            async for update in cast(AsyncIterator[Update], updates):
                yield update
        else:
            for update in cast(Iterable[Update], updates):  # not an async generator: the handler's other kind
                yield update

    async def call(self, call: Call, headers: Mapping[str, str]) -> AsyncGenerator[CallUpdate, None]:
        """A developer function's call, answered by ``call_handler`` (none: as the base class)."""
        if self._call_handler is None:
            async for update in super().call(call, headers):
                yield update
            return
        updates = self._call_handler(call, headers)
        if inspect.isasyncgen(updates):
            async for update in cast(AsyncIterator[CallUpdate], updates):
                yield update
        else:
            for update in cast(Iterable[CallUpdate], updates):
                yield update

    async def standing(self, headers: Mapping[str, str]) -> dict[str, Any]:
        return self._standing(headers)

    async def health(self, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        return dict(self._health)
