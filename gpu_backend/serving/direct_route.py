"""The direct route: one HTTP request per call from the frontend, outside Gradio's queue.

``POST /splitspace/v1/call`` takes a call of one of the app's ``@splitspace.gpu`` functions
(the built-in app's ``generate`` included; :class:`~shared.contract.calls.Call` as one
frame: its JSON line, then its files' bytes, ``shared/contract/frames.py``; so its body
may be as large as ``call_body_limit``; a JSON body without files is such a frame) and
answers with frames: status lines while the job waits (a stream's partial outputs as they
come), then the :class:`~shared.contract.calls.CallResult` (a function's output files
after its line) or an error line. Refusals that need no waiting (token, an unknown
function: a 404 naming it, an input that cannot be read, admission) are plain HTTP errors:
401, 404, 422, 429 with ``Retry-After``, each a JSON body with the contract's title and
message. The guard in front passes the call's body unread as JSON (it is not); its JSON
line is held to the call's limits here (``JsonLimits``), before it is parsed.
``POST /splitspace/v1/standing`` returns the caller's quota standing.

Why it is not a Gradio endpoint: the scheduler, not Gradio's queue, orders the work, so
the queue's join-then-stream protocol, session state and event bookkeeping are pure
overhead on this hop. Measured on a 2-core machine they cost the GPU tier about 10 ms of
CPU per call (this route: a few ms) and the frontend a second request per call
(``bench/hop.py``). A caller that goes away closes the connection, and the job leaves
the queue at that moment.

A pure ASGI app (the manner of Starlette's own middleware): it watches
``receive`` for the disconnect while it streams, which a plain
``StreamingResponse`` does not do on every server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import gradio as gr
from gradio.context import LocalContext
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from splitspace.gpu_backend.admission.runner import RunnerUpdate, Ticket
from splitspace.gpu_backend.serving.service import CallService
from splitspace.shared.contract import frames
from splitspace.shared.contract.calls import Call
from splitspace.shared.contract.errors import (
    ServiceUnavailable,
    SplitspaceError,
    Throttled,
    Unauthorized,
    UnknownEndpoint,
    ValidationFailed,
    to_wire,
)
from splitspace.shared.contract.headers import IDENTITY_HEADER, IP_TOKEN_HEADER
from splitspace.shared.contract.hop import error_to_wire
from splitspace.shared.http.json_limits import DEFAULT_LIMITS, JsonLimitExceeded, JsonLimits

log = logging.getLogger("splitspace.gpu")

STANDING_PATH = "/splitspace/v1/standing"


class DirectRoutes:
    """The ASGI app behind both paths (mount each with ``Route(path, app, methods=["POST"])``);
    a thin adapter: the rules are the service's. ``max_call_bytes``: the largest body of
    a call (``call_body_limit``); ``max_file_bytes``: the largest file in it;
    ``call_limits``: the limits of its JSON line."""

    def __init__(
        self,
        service: CallService,
        max_call_bytes: int,
        *,
        max_file_bytes: int | None = None,
        call_limits: JsonLimits = DEFAULT_LIMITS,
    ) -> None:
        self.service = service
        self.max_call_bytes = max_call_bytes
        self.max_file_bytes = max_file_bytes if max_file_bytes is not None else max_call_bytes
        self.call_limits = call_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        token = request.headers.get(IDENTITY_HEADER)
        try:
            if scope["path"] == STANDING_PATH:
                await _send_json(send, 200, self.service.standing(token))
                return
            # CALL_PATH, the only other path this app is mounted at
            claims = self.service.arrive(token)
            call = _call(await self._read_frame(request))
            # ZeroGPU's @spaces.GPU reads the caller's x-ip-token from Gradio's request
            # context; the runner runs the GPU function in the context captured at admit().
            LocalContext.request.set(gr.Request(request=request))
            ticket = await self.service.enter_call(claims, call, request.headers.get(IP_TOKEN_HEADER))
        except SplitspaceError as exc:
            await _send_error(send, exc)
            return
        await self._stream(receive, send, ticket)

    async def _read_frame(self, request: Request) -> Any:
        """A call's body: one frame, its JSON line within the call's limits, each file
        within ``max_file_bytes`` and matching its sha256 (in a thread when it is large)."""
        body = await _read_body(request, self.max_call_bytes)
        try:
            frame = frames.split_body(body, max_file_bytes=self.max_file_bytes)
            self.call_limits.check(frame.line)
            if frame.small:
                return frames.decode(frame, max_file_bytes=self.max_file_bytes)
            return await asyncio.to_thread(frames.decode, frame, max_file_bytes=self.max_file_bytes)
        except JsonLimitExceeded as exc:
            raise ValidationFailed("body", f"the body has {exc.message}") from None  # (as the guard says it)
        except frames.BadFrame as exc:
            raise ValidationFailed("body", str(exc)) from None

    async def _stream(self, receive: Receive, send: Send, ticket: Ticket) -> None:
        updates = self.service.follow(ticket)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", frames.FRAME_TYPE.encode()), (b"cache-control", b"no-store")],
                }
            )
            await _until_disconnect(receive, _relay(send, updates))
        finally:
            await updates.aclose()
            self.service.drop(ticket)


async def _relay(send: Send, updates: AsyncIterator[RunnerUpdate]) -> None:
    """Each update as a line; an error ends the stream with an error line."""
    while True:
        try:
            doc = (await anext(updates)).to_wire()
        except StopAsyncIteration:
            break
        except SplitspaceError as exc:
            doc = error_to_wire(exc)
        await send({"type": "http.response.body", "body": frames.encode(doc), "more_body": True})
        if doc["status"] in ("done", "error"):
            break
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: Receive, work: Awaitable[None]) -> None:
    """Run ``work``; cancel it the moment the client disconnects."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            t.cancel()
        for t in (task, watcher):
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the client went away mid-send: nobody left to tell
                log.debug("stream ended early: %s", type(exc).__name__)


def _call(body: Any) -> Call:
    try:
        return Call.from_wire(body)
    except ValueError as exc:  # its message starts with the field it names
        field, _, message = str(exc).partition(" ")
        raise ValidationFailed(field if field in ("endpoint", "data") else "body", message) from None


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ValidationFailed("body", f"must be at most {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send_json(
    send: Send, status: int, doc: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, exc: SplitspaceError) -> None:
    if isinstance(exc, Unauthorized):
        await _send_json(send, 401, to_wire(exc))
    elif isinstance(exc, ValidationFailed):
        await _send_json(send, 422, to_wire(exc))
    elif isinstance(exc, UnknownEndpoint):
        await _send_json(send, 404, to_wire(exc))
    elif isinstance(exc, Throttled):
        await _send_json(send, 429, to_wire(exc), ((b"retry-after", str(exc.retry_after_whole_s).encode()),))
    elif isinstance(exc, ServiceUnavailable):  # the shared store (Redis) is down: nothing was charged
        await _send_json(send, 503, to_wire(exc), ((b"retry-after", str(exc.retry_after_whole_s).encode()),))
    else:
        await _send_json(send, 503, to_wire(exc))
