"""The door's first check, before Gradio does any work: a client over its cap is refused.

A pure ASGI middleware (in the manner of Starlette's): for a REST call that
starts a ``/generate`` job (``POST /gradio_api/call/generate`` and its
``v2``, ``run`` and ``api`` twins: curl, httpx, any HTTP client), it resolves
the caller's identity from the headers and cookies (no body parsing) and asks
the door (``door.py``) whether the client's flow already has its
``max_running + max_queued`` requests in flight. If so, the answer is HTTP 429
with ``Retry-After`` and a JSON body ``{"title": "Queue full", "message":
"... Retry in 1 s.", "retry_after_s"}``, and Gradio never sees the request:
no event, no session, no queue entry. Otherwise the request goes on
unchanged; the handler then holds the client's place at the door, and checks
the cap again exactly (calls that pass here at the same moment are counted as
arriving until Gradio has answered their POST).

``/gradio_api/queue/join`` (browsers, ``gradio_client``, ``@gradio/client``)
is left to the handler's check, a few milliseconds later: those clients show
an error that arrives in the event stream with its message, while a refused
join would reach their users as a bare HTTP status.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Collection

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from session.identity import Identity
from shared.errors import SplitspaceError, Throttled, to_wire

from .door import FairDoor

class DoorMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        door: FairDoor,
        identify: Callable[[Request], Identity],
        cap: Callable[[Identity], int],
        api_names: Collection[str],
        prefix: str = "/gradio_api",
    ) -> None:
        self.app = app
        self.door = door
        self.identify = identify
        self.cap = cap
        self.call_paths = frozenset(
            f"{prefix}/{route}/{name}{slash}"
            for route in ("call", "call/v2", "run", "api") for name in api_names for slash in ("", "/")
        )
        self._arriving: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if scope["path"] in self.call_paths:
            await self._gate(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            identity = self.identify(Request(scope))
            flow = identity.flow_id
            self.door.check_cap(flow, self.cap(identity), arriving=self._arriving[flow])
        except Throttled as exc:
            await _refuse(send, exc)
            return
        except SplitspaceError:  # e.g. an unknown API key: the handler says so in its own way
            await self.app(scope, receive, send)
            return
        self._arriving[flow] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._arriving[flow] -= 1
            if not self._arriving[flow]:
                del self._arriving[flow]


async def _refuse(send: Send, exc: Throttled) -> None:
    # The message in full ("... Retry in 1 s."), as REST callers read errors elsewhere.
    body = json.dumps({**to_wire(exc), "message": exc.message}).encode()
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(exc.retry_after_whole_s).encode())]})
    await send({"type": "http.response.body", "body": body})
