"""The door before Gradio: REST calls wait in their client's line at a cost of bytes.

Why it exists: Gradio spends milliseconds of the frontend's one event loop on every
call it takes in (the POST, an event in its queue, a worker, a status stream), in
arrival order. A crowd of 2,000 calls therefore kept a light client that came 3 s
later waiting for the crowd to be taken in, before the fair door (``door.py``) or the
GPU tier's fair scheduler could put it first (issue 10). Kubernetes' API Priority and
Fairness holds a flood in the HTTP filter chain, before the expensive handler; this
pure ASGI middleware (in the manner of Starlette's) does the same for the REST calls
of each GPU event (curl, httpx, any HTTP client): every ``@splitspace.gpu`` event of the
app served (the built-in's ``/generate`` among them):

1. It resolves the caller's identity from the headers and cookies and reads the body
   (already size-capped by the guard). A body that is not a valid call (``is_request``:
   the app's own validation, ``api/validation.py``) goes on to Gradio unchanged, which
   refuses it naming the input (422 at the ``POST``, from the event's validator).
2. It joins the client's line at the door (``FrontendCore.join_door``): a client over its
   in-flight cap gets HTTP 429 with ``Retry-After`` and ``{"title": "Queue full",
   "message", "retry_after_s"}`` (503 "Service unavailable" when the shared count on
   Redis cannot be reached in ``closed`` mode), and Gradio never sees the request.
3. ``POST /call/<api>`` (and ``/call/v2``) is answered at once with an event id of
   the door's own, as Gradio answers it, and the call is *parked*: counted in its
   client's cap, not in line. When its caller opens the event stream (``GET
   /call/generate/<id>``) it joins the line; the stream tells the caller its place at
   the door, in the events Gradio sends (``event: generating``, the handler's status
   dict, for the built-in's ``/generate``; an app's outputs are its own, so its stream
   says ``event: heartbeat`` meanwhile), and when the turn comes the call is made to Gradio from here, with a one-time
   pass for its place (``DOOR_PASS_HEADER``) that the handler takes instead of joining
   again, and Gradio's own stream continues the reply. A place inside is for work
   someone waits for: calls let in before anyone read them kept the door full for free
   while the GPU idled (40 addresses POSTing their caps every 31 s and never reading),
   and calls run for nobody took the GPU from those who read theirs. A call whose stream
   is never opened gives its room in the cap back after ``UNCLAIMED_S``.
4. A synchronous call (``/run``, ``/api``) goes on to Gradio with its pass when its place
   is inside, at once or after waiting here while its connection stays open. A caller
   who leaves while held leaves its line.

``/gradio_api/queue/join`` (browsers, ``gradio_client``, ``@gradio/client``) goes to
Gradio, and waits at the door in the handler: those clients read refusals and places
from Gradio's own protocol.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitspace.cpu_frontend.door.door import FairDoor, Place
from splitspace.cpu_frontend.door.status_feed import Told, wait_turn
from splitspace.session.identity import Identity
from splitspace.shared.contract.errors import ServiceUnavailable, SplitspaceError, Throttled, to_wire
from splitspace.shared.contract.hop import status_for_api

DOOR_PASS_HEADER = "x-splitspace-door-pass"
"""The one-time pass of a place the middleware holds (set here, stripped from callers)."""
_PASS = DOOR_PASS_HEADER.encode()
UNCLAIMED_S = 30.0
"""A parked call whose stream nobody opened in this long gives its room in its client's cap
back (it never had a place inside); a pass the handler never took gives its place back."""


@dataclass(eq=False)
class _Held:
    """A ``/call`` answered with the door's own event id, waiting for its stream."""

    scope: Scope
    body: bytes
    place: Place
    tells_status: bool
    """Whether its stream tells its place in ``generating`` events (the built-in's
    ``/generate``, whose second output is the status dict); else heartbeats only."""
    expiry: asyncio.TimerHandle | None = field(default=None)


class HeldCalls:
    """The REST calls held here. ``by_id``: those answered with the door's own event id,
    until their stream starts (the guard, in front, lets those streams through:
    ``__contains__``); ``waiting``: every call waiting here that Gradio has not seen."""

    def __init__(self) -> None:
        self.by_id: dict[str, _Held] = {}
        self.waiting = 0

    def __contains__(self, event_id: object) -> bool:
        return event_id in self.by_id


class DoorMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        door: FairDoor,
        identify: Callable[[Request], Identity],
        join: Callable[[Identity, bool], Awaitable[Place]],
        is_request: Callable[[str, object], bool],
        seconds_per_job: Callable[[], float],
        api_names: Collection[str],
        held: HeldCalls | None = None,
        prefix: str = "/gradio_api",
        tells_status: Callable[[str], bool] = lambda api_name: True,
    ) -> None:
        self.app = app
        self.door = door
        self.identify = identify
        self.join = join
        self.is_request = is_request
        self.seconds_per_job = seconds_per_job
        self.tells_status = tells_status
        self.prefix = prefix
        # route -> its API name, how its body carries the fields ("list": {"data": [...]},
        # "named": {field: value}) and whether it is streamed
        self.posts: dict[str, tuple[str, str, bool]] = {}
        for name in api_names:
            for slash in ("", "/"):
                self.posts[f"{prefix}/call/{name}{slash}"] = (name, "list", True)
                self.posts[f"{prefix}/call/v2/{name}{slash}"] = (name, "named", True)
                for sync in ("run", "api"):
                    self.posts[f"{prefix}/{sync}/{name}{slash}"] = (name, "list", False)
        self.streams = tuple(f"{prefix}/call/{route}{name}/" for name in api_names for route in ("", "v2/"))
        self._held = HeldCalls() if held is None else held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = _without_pass(scope)
            path = scope["path"]
            if scope["method"] == "POST" and path in self.posts:
                await self._post(scope, receive, send, *self.posts[path])
                return
            if scope["method"] == "GET" and path.startswith(self.streams):
                held = self._held.by_id.pop(path.rsplit("/", 1)[-1], None)
                if held is not None:
                    await self._stream(held, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    # -- the POST -----------------------------------------------------------------------
    async def _post(
        self, scope: Scope, receive: Receive, send: Send, api_name: str, shape: str, streamed: bool
    ) -> None:
        body, last = await _read_body(receive)
        replay = _replay(body, last, receive)
        try:
            identity = self.identify(Request(scope))
            payload = json.loads(body)
            values = payload if shape == "named" else payload["data"]
            if not self.is_request(api_name, values):
                raise ValueError("not a valid request: the handler says why")
        except (SplitspaceError, ValueError, KeyError, TypeError):  # an unknown key, a bad body
            await self.app(scope, replay, send)
            return
        try:  # a /call is parked (counted, not in line) until its caller opens the stream
            place = await self.join(identity, streamed)
        except (Throttled, ServiceUnavailable) as exc:
            await _refuse(send, exc)
            return
        if streamed:
            event_id = uuid.uuid4().hex
            held = _Held(scope, body, place, self.tells_status(api_name))
            held.expiry = asyncio.get_running_loop().call_later(UNCLAIMED_S, self._expire, event_id)
            self._held.by_id[event_id] = held
            self._held.waiting += 1
            await _send_json(send, 200, {"event_id": event_id})
            return
        try:
            if not place.inside:  # a synchronous call waits for its turn here
                gone = asyncio.ensure_future(_disconnected(replay))
                self._held.waiting += 1
                try:
                    waits: list[asyncio.Future[Any]] = [place.turn, gone]
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._held.waiting -= 1
                    if not place.inside:
                        gone.cancel()
                if not place.inside:
                    return
                replay = _after(body, gone)
            await self._hand_on(place, scope, replay, send, streamed=False)
        except BaseException:
            place.leave()
            raise

    async def _hand_on(self, place: Place, scope: Scope, receive: Receive, send: Send, streamed: bool) -> None:
        """Make the call to Gradio with the place's pass; a pass the handler did not take
        (Gradio refused the call, or its event never ran) gives the place back."""
        nonce = self.door.hand_over(place)
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(_with_pass(scope, nonce), receive, watch)
        finally:
            if not streamed or status != [200]:
                self._unclaimed(nonce, place)
            else:  # the event runs soon, in Gradio's queue; its handler takes the pass then
                asyncio.get_running_loop().call_later(UNCLAIMED_S, self._unclaimed, nonce, place)

    def _unclaimed(self, nonce: str, place: Place) -> None:
        if self.door.take(nonce, place.flow_id) is place:
            place.leave()

    def _expire(self, event_id: str) -> None:
        held = self._held.by_id.pop(event_id, None)
        if held is not None:
            self._held.waiting -= 1
            held.place.leave()

    # -- the held call's stream -------------------------------------------------------------
    async def _stream(self, held: _Held, scope: Scope, receive: Receive, send: Send) -> None:
        if held.expiry is not None:
            held.expiry.cancel()
        place = held.place
        place.unpark()
        gone = asyncio.ensure_future(_disconnected(receive))
        counted = True
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                    ],
                }
            )
            told = Told(place.told)
            statuses = wait_turn(place, told, self.seconds_per_job, gone)
            try:
                async for status in statuses:
                    if gone.done():
                        return
                    if held.tells_status:
                        await send(_event("generating", [None, status_for_api(status)]))
                    else:  # an app's outputs are its own: the wait shows as Gradio's heartbeats
                        await send(_event("heartbeat", None))
                    if gone.done():
                        return
            finally:
                await statuses.aclose()
            if gone.done():
                return
            place.told = told.status
            self._held.waiting -= 1
            counted = False
            await self._continue(held, scope, gone, send)
        finally:
            if counted:
                self._held.waiting -= 1
            gone.cancel()
            place.leave()

    async def _continue(self, held: _Held, scope: Scope, gone: asyncio.Future[Message], send: Send) -> None:
        """The turn came: POST the call to Gradio with the place's pass, then pass Gradio's
        event stream on (its response start is ours, already sent)."""
        answer: list[Message] = []

        async def keep(message: Message) -> None:
            answer.append(message)

        await self._hand_on(held.place, held.scope, _after(held.body, gone), keep, True)
        start = next((m for m in answer if m["type"] == "http.response.start"), None)
        body = b"".join(m.get("body", b"") for m in answer if m["type"] == "http.response.body")
        if start is None or start["status"] != 200:
            detail = _detail(body)
            await send(_event("error", detail, more=False))
            return
        event_id = json.loads(body)["event_id"]
        path = scope["path"].rsplit("/", 1)[0] + "/" + event_id
        inner = {**scope, "path": path, "raw_path": path.encode()}

        async def onward(message: Message) -> None:
            if message["type"] != "http.response.start":
                await send(message)

        await self.app(inner, _after(b"", gone), onward)


# -- small ASGI helpers ------------------------------------------------------------------------
async def _read_body(receive: Receive) -> tuple[bytes, Message]:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), message


def _replay(body: bytes, last: Message, receive: Receive) -> Receive:
    """A receive that gives the body read already, then what the client sends next."""
    first = [{"type": "http.request", "body": body, "more_body": False} if last["type"] == "http.request" else last]

    async def again() -> Message:
        return first.pop() if first else await receive()

    return again


def _after(body: bytes, gone: asyncio.Future[Message]) -> Receive:
    """A receive for a call made from here: the body, then the caller's disconnect (shielded:
    Starlette's ``is_disconnected`` cancels its receive at once)."""
    first = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return first.pop() if first else await asyncio.shield(gone)

    return receive


async def _disconnected(receive: Receive) -> Message:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message


def _without_pass(scope: Scope) -> Scope:
    headers = scope.get("headers") or []
    if any(k == _PASS for k, _ in headers):
        return {**scope, "headers": [(k, v) for k, v in headers if k != _PASS]}
    return scope


def _with_pass(scope: Scope, nonce: str) -> Scope:
    return {**scope, "headers": [*scope["headers"], (_PASS, nonce.encode())]}


def _event(name: str, data: object, more: bool = True) -> Message:
    # the form of Gradio's /call event stream
    return {
        "type": "http.response.body",
        "body": f"event: {name}\ndata: {json.dumps(data)}\n\n".encode(),
        "more_body": more,
    }


def _detail(body: bytes) -> object:
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    return doc.get("detail", doc) if isinstance(doc, dict) else doc


async def _send_json(send: Send, status: int, doc: object, headers: Collection[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _refuse(send: Send, exc: Throttled | ServiceUnavailable) -> None:
    # The message in full ("... Retry in 1 s."), as REST callers read errors elsewhere.
    status = 429 if isinstance(exc, Throttled) else 503
    await _send_json(
        send,
        status,
        {**to_wire(exc), "message": exc.message},
        [(b"retry-after", str(exc.retry_after_whole_s).encode())],
    )
