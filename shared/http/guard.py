"""A pure ASGI layer in front of each tier's whole app: malformed calls get a 4xx, never a 5xx.

Why it exists: Gradio's own routes answer many malformed calls with an HTTP
500 or a reply broken off mid-stream, and log every one with a traceback
(gradio 6.31, ``routes.py`` and ``queueing.py``):

- ``POST /gradio_api/call/v2/<api>`` with a missing or unknown parameter
  (``construct_args`` raises ``TypeError``), or an api name it does not know
  (``KeyError``);
- ``POST /gradio_api/call/<api>``, ``/run/<api>`` and ``/queue/join`` with an
  unknown api name or ``fn_index``, or the wrong number of inputs (the event is
  queued, fails in ``preprocess_data`` and logs all of its inputs);
- ``GET /gradio_api/call/<api>/<event_id>`` and ``/queue/data`` for an event or
  session it does not know: the stream raises after it started, the reply is
  cut off (``ChunkedEncodingError``);
- ``POST /gradio_api/upload`` stores any form of any size, though neither tier
  has a file input;
- request bodies of any size are read and parsed;
- 10 KB of nested ``[`` made every parser behind it raise ``RecursionError``: a 500,
  a traceback, and a keep-alive connection that failed its next request.

So this layer checks what Gradio would choke on before Gradio sees it: body
size first (``Content-Length``, then the bytes as they arrive, with a deadline),
then the limits of every body's JSON on its bytes, before any parser reads it
(nesting depth, items, string and number literals: ``shared/http/json_limits.py``),
then the call's shape against a table of the app's endpoints derived from the
Blocks at build time (:class:`EndpointTable`: api names, ``fn_index``, number
of inputs, named parameters). A refusal is a 4xx with a JSON body
``{"title", "message"}`` that names what was wrong, echoes at most a short
repr of what was sent, and costs at most one log line (at INFO, no inputs).

Behind the checks it is a safety net: a 500 that Gradio produces for a call
that raised ``gr.Error`` (the ``/run/`` route does that) gets the status its
title means; any other 500 gets a JSON body; an exception after the reply
started ends the reply cleanly (an event stream with a last ``event: error``
that has a title) instead of breaking the connection; an ``event: error`` whose
data carries no title gets one.

Written in the manner of Starlette's middleware: options are typed and checked
once in ``__init__``, non-HTTP scopes pass straight through, responses are
edited only by wrapping ``send``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitspace.shared.contract.errors import (
    BACKEND_UNAVAILABLE,
    INVALID_REQUEST,
    QUEUE_FULL,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    UNAUTHORIZED,
)
from splitspace.shared.contract.schema import echo as short
from splitspace.shared.http.json_limits import DEFAULT_LIMITS, JsonLimitExceeded, JsonLimits

log = logging.getLogger("splitspace.guard")
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+

API_PREFIX = "/gradio_api"
DEFAULT_MAX_BODY_BYTES = 16 * 1024
"""Enough for any JSON call of either tier (a 1,000-character prompt is about 4 KB of JSON)."""
DEFAULT_BODY_TIMEOUT_S = 10.0

UNKNOWN_ENDPOINT = "Unknown endpoint"
UNKNOWN_EVENT = "Unknown event"
MALFORMED = "Malformed request"
TOO_LARGE = "Request too large"
TOO_SLOW = "Request timeout"
UPLOADS_REFUSED = "Uploads refused"
FORMS_REFUSED = "Unsupported media type"
SERVER_ERROR = "Server error"
STREAM_ERROR = "Stream error"

_TITLE_STATUS = {
    INVALID_REQUEST: 422,
    UNAUTHORIZED: 401,
    RATE_LIMITED: 429,
    QUOTA_EXCEEDED: 429,
    QUEUE_FULL: 429,
    BACKEND_UNAVAILABLE: 503,
    "GPU error": 502,
}
"""The status a titled ``gr.Error`` means, where Gradio answers every one with 500."""


RefusalBody = Callable[[int, str, str], dict[str, Any]]
"""``(status, title, message)`` -> the JSON body of a refusal, in a route's own error shape."""


class Refusal(Exception):
    """A request this layer answers itself: status, title, message."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


@dataclass(frozen=True)
class Endpoint:
    """One event of the Blocks, as the API routes see it."""

    fn_index: int
    api_name: str | None
    inputs: int
    """Number of input components (what ``/queue/join`` and ``/run/`` must send)."""
    api_inputs: int
    """Inputs without the ones hidden from the API (``gr.State``): ``/call/`` may send this many."""
    parameters: tuple[tuple[str, bool], ...] | None = None
    """``(name, has_default)`` of each named parameter, for ``/call/v2/``; None: not there."""
    queued: bool = True

    def arity_text(self, counts: set[int]) -> str:
        return " or ".join(str(n) for n in sorted(counts))


@dataclass
class EndpointTable:
    """The app's endpoints, derived from the Gradio Blocks (never a hand-written copy)."""

    by_index: dict[int, Endpoint] = field(default_factory=dict)
    by_name: dict[str, Endpoint] = field(default_factory=dict)
    api_open: bool = True
    server_functions: bool = False

    @classmethod
    def from_blocks(cls, blocks: Any) -> EndpointTable:
        named = (blocks.get_api_info().get("named_endpoints") or {}) if blocks.fns else {}
        table = cls(api_open=bool(getattr(blocks, "api_open", True)))
        for index, fn in blocks.fns.items():
            api_name = fn.api_name if isinstance(fn.api_name, str) and fn.api_name else None
            info = named.get(f"/{api_name}") if api_name else None
            parameters = None
            if info is not None:
                parameters = tuple(
                    (p["parameter_name"], bool(p.get("parameter_has_default"))) for p in info["parameters"]
                )
            endpoint = Endpoint(
                fn_index=index,
                api_name=api_name,
                inputs=len(fn.inputs),
                api_inputs=sum(1 for b in fn.inputs if not getattr(b, "skip_api", False)),
                parameters=parameters,
                queued=bool(fn.queue),
            )
            table.by_index[index] = endpoint
            if api_name:
                table.by_name.setdefault(api_name, endpoint)
        table.server_functions = any(
            getattr(value, "_is_server_fn", False)
            for block in getattr(blocks, "blocks", {}).values()
            for cls in type(block).__mro__
            for value in vars(cls).values()
        )
        return table


_NAME = r"[^/]+"
_CALL_V2 = re.compile(rf"^{API_PREFIX}/call/v2/({_NAME})/?$")
_CALL = re.compile(rf"^{API_PREFIX}/call/({_NAME})/?$")
_RUN = re.compile(rf"^{API_PREFIX}/(?:run|api)/({_NAME})/?$")
_JOIN = re.compile(rf"^{API_PREFIX}/queue/join/?$")
_STREAM = re.compile(rf"^{API_PREFIX}/call/(?:v2/)?({_NAME})/({_NAME})/?$")
_QUEUE_DATA = re.compile(rf"^{API_PREFIX}/queue/data/?$")
_UPLOADS = re.compile(rf"^{API_PREFIX}/(?:upload|upload_progress|process_recording|stream/{_NAME})/?$")
_COMPONENT_SERVER = re.compile(rf"^{API_PREFIX}/component_server/?$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PATH_WORDS = frozenset(
    {
        "gradio_api",
        "call",
        "v2",
        "run",
        "api",
        "queue",
        "join",
        "data",
        "upload",
        "upload_progress",
        "process_recording",
        "stream",
        "component_server",
        "mcp",
        "info",
        "config",
        "health",
        "metrics",
        "admin",
        "splitspace",
        "v1",
        "standing",
        "file",
        "heartbeat",
        "cancel",
        "images",
        "generations",
        "models",
    }
)


class GradioGuard:
    """Refuses malformed calls with a 4xx before Gradio sees them; see the module docstring.

    ``blocks``: the app's ``gr.Blocks`` (after ``queue()``), read once here for the
    endpoint table and at request time for the event ids its queue holds.
    ``max_body_bytes``: the limit of every request body; ``body_limits``: a larger
    or smaller limit for paths that start with a given prefix (the GPU tier's
    direct route takes 64 KiB). ``body_timeout_s``: the deadline for a whole body.
    ``json_limits``: the limits of every body's JSON (the defaults of ``shared/http/json_limits.py``);
    ``json_limits_by_path``: other limits for paths that start with a given prefix; None: the
    body there is not JSON, and its route checks it (the GPU tier's call route takes a frame:
    a JSON line, then files' bytes, ``shared/contract/frames.py``).
    ``uploads``: Gradio's upload route is open (the app has file inputs: a developer's app);
    its forms pass unread, and Gradio bounds each file (``max_file_size``).
    ``elsewhere``: path prefixes served by another app than ``blocks`` (the GPU tier's
    operators' dashboard, a second Blocks behind its own login): only the size and JSON
    limits of their bodies are checked (forms pass: its login is one), nothing else.
    ``refusal_bodies``: for paths that start with a given prefix, the body of a refusal
    made from its ``(status, title, message)`` instead of ``{"title", "message"}``: a route
    that speaks another API's error shape (OpenAI's, on the frontend's ``/v1/images``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        blocks: Any,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_limits: Mapping[str, int] | None = None,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        json_limits: JsonLimits = DEFAULT_LIMITS,
        json_limits_by_path: Mapping[str, JsonLimits | None] | None = None,
        elsewhere: tuple[str, ...] = (),
        held_events: Callable[[str], bool] | None = None,
        uploads: bool = False,
        refusal_bodies: Mapping[str, RefusalBody] | None = None,
    ) -> None:
        if max_body_bytes < 0 or body_timeout_s <= 0:
            raise ValueError("max_body_bytes must be >= 0 and body_timeout_s > 0")
        self.app = app
        self.elsewhere = tuple(elsewhere)
        self.held_events = held_events
        """Event ids a layer behind the guard answers for itself (the frontend's door holds
        REST calls before Gradio knows them)."""
        self.blocks = blocks
        self.table = EndpointTable.from_blocks(blocks)
        self._path_words = _PATH_WORDS | set(self.table.by_name)
        self.max_body_bytes = max_body_bytes
        self.body_limits = sorted((body_limits or {}).items(), key=lambda kv: -len(kv[0]))
        self.body_timeout_s = body_timeout_s
        self.json_limits = json_limits
        self.json_limits_by_path = sorted((json_limits_by_path or {}).items(), key=lambda kv: -len(kv[0]))
        self.uploads = uploads
        self.refusal_bodies = sorted((refusal_bodies or {}).items(), key=lambda kv: -len(kv[0]))

    # -- the ASGI entry point ------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        method = scope["method"]
        outside = bool(self.elsewhere) and path.startswith(self.elsewhere)
        if self.uploads and method == "POST" and _UPLOADS.match(path) and _is_form(scope):
            await self.app(scope, receive, send)  # Gradio's own upload route bounds each file
            return
        try:
            if not outside:
                self._refuse_early(method, path, scope)
            if method in _BODY_METHODS and not (outside and _is_form(scope)):
                body = await self._read_body(scope, receive, self._limit_for(path))
                if body is None:
                    return  # the client went away while sending
                self._check_json(body, path)
                if not outside:
                    self._check_call(path, body)
                receive = _replay(body, receive)
            elif method == "GET" and not outside:
                self._check_stream(path, scope)
        except Refusal as refusal:
            log.info("refused %s %s: %d %s", method, self._label(path), refusal.status, refusal.title)
            shape = next((make for prefix, make in self.refusal_bodies if path.startswith(prefix)), None)
            shaped = None if shape is None else shape(refusal.status, refusal.title, refusal.message)
            await send_problem(send, refusal.status, refusal.title, refusal.message, shaped)
            return
        if outside:
            await self.app(scope, receive, send)
            return
        await _Forward(self.app, scope, method, self._label(path))(receive, send)

    def _label(self, path: str) -> str:
        """The path for a log line, with every part a caller chose (an event id, an unknown
        name) shown as ``*``: a log line echoes no input."""
        parts = path.strip("/").split("/")[:5]
        return "/" + "/".join(p if p in self._path_words else "*" for p in parts)

    # -- the checks ------------------------------------------------------------------------------
    def _limit_for(self, path: str) -> int:
        for prefix, limit in self.body_limits:
            if path.startswith(prefix):
                return limit
        return self.max_body_bytes

    def _refuse_early(self, method: str, path: str, scope: Scope) -> None:
        if _UPLOADS.match(path) and method != "OPTIONS" and not self.uploads:
            raise Refusal(403, UPLOADS_REFUSED, "this app takes no file uploads (it has no file input)")
        if _COMPONENT_SERVER.match(path) and not self.table.server_functions:
            raise Refusal(404, UNKNOWN_ENDPOINT, "this app has no component server functions")
        if _is_form(scope) and method in _BODY_METHODS:
            raise Refusal(415, FORMS_REFUSED, "forms are not accepted; send JSON (application/json)")
        length = _header(scope, b"content-length")
        if length:
            try:
                size = int(length)
            except ValueError:
                raise Refusal(400, MALFORMED, "Content-Length is not a number") from None
            limit = self._limit_for(path)
            if size > limit:
                raise Refusal(413, TOO_LARGE, f"the body must be at most {limit} bytes, got {size}")

    async def _read_body(self, scope: Scope, receive: Receive, limit: int) -> bytes | None:
        try:
            if _timeout is not None:  # one timer for the whole body (wait_for costs a task per message)
                async with _timeout(self.body_timeout_s):
                    return await self._read_all(receive, limit)
            return await asyncio.wait_for(self._read_all(receive, limit), self.body_timeout_s)
        except TimeoutError:
            raise Refusal(408, TOO_SLOW, f"the body did not arrive within {self.body_timeout_s:g} s") from None

    @staticmethod
    async def _read_all(receive: Receive, limit: int) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refusal(413, TOO_LARGE, f"the body must be at most {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _check_json(self, body: bytes, path: str) -> None:
        limits = next((lim for prefix, lim in self.json_limits_by_path if path.startswith(prefix)), self.json_limits)
        if limits is None:  # not JSON: its route checks it
            return
        try:
            limits.check(body)
        except JsonLimitExceeded as exc:
            status, title = (400, MALFORMED) if exc.malformed else (413, TOO_LARGE)
            raise Refusal(status, title, f"the body has {exc.message}") from None

    def _check_call(self, path: str, body: bytes) -> None:
        if m := _CALL_V2.match(path):
            endpoint = self._named(m.group(1), v2=True)
            self._check_v2(endpoint, _json_object(body))
        elif m := _CALL.match(path):
            endpoint = self._named(m.group(1))  # (this route ignores a fn_index in the body)
            self._check_data(endpoint, _predict_body(body), {endpoint.inputs, endpoint.api_inputs})
        elif m := _RUN.match(path):
            doc = _predict_body(body)
            # A page's unqueued events (e.g. an example filling the form) come as
            # /run/predict with their fn_index; API callers name the endpoint.
            endpoint = self._indexed(doc["fn_index"]) if doc.get("fn_index") is not None else self._named(m.group(1))
            if not self.table.api_open and endpoint.queued:
                raise Refusal(404, UNKNOWN_ENDPOINT, "this endpoint takes no direct calls; use /gradio_api/call/")
            self._check_data(endpoint, doc, {endpoint.inputs})
        elif _JOIN.match(path):
            doc = _predict_body(body)
            if doc.get("fn_index") is None:
                raise Refusal(422, INVALID_REQUEST, "fn_index: is required")
            if not doc.get("session_hash"):
                raise Refusal(422, INVALID_REQUEST, "session_hash: is required")
            endpoint = self._indexed(doc["fn_index"])
            self._check_data(endpoint, doc, {endpoint.inputs})

    def _named(self, name: str, *, v2: bool = False) -> Endpoint:
        endpoint = self.table.by_name.get(name)
        if endpoint is None or (v2 and endpoint.parameters is None):
            known = ", ".join(sorted(n for n, e in self.table.by_name.items() if e.parameters is not None))
            raise Refusal(404, UNKNOWN_ENDPOINT, f"no endpoint named {short(name)} (endpoints: {known})")
        return endpoint

    def _indexed(self, fn_index: Any) -> Endpoint:
        endpoint = self.table.by_index.get(fn_index) if type(fn_index) is int else None
        if endpoint is None:
            raise Refusal(404, UNKNOWN_ENDPOINT, f"fn_index: no event with index {short(fn_index)}")
        return endpoint

    @staticmethod
    def _check_v2(endpoint: Endpoint, doc: dict[str, Any]) -> None:
        assert endpoint.parameters is not None  # noqa: S101 - _named(v2=True) checked it
        names = [n for n, _ in endpoint.parameters]
        for key in doc:
            if key not in names and key != "oauth_token":
                raise Refusal(
                    422, INVALID_REQUEST, f"{short(key)}: unknown parameter (parameters: {', '.join(names) or 'none'})"
                )
        for name, has_default in endpoint.parameters:
            if not has_default and name not in doc:
                raise Refusal(422, INVALID_REQUEST, f"{name}: is required")

    @staticmethod
    def _check_data(endpoint: Endpoint, doc: dict[str, Any], counts: set[int]) -> None:
        if doc.get("batched"):
            raise Refusal(422, INVALID_REQUEST, "batched: this endpoint takes one call at a time")
        data = doc["data"]
        if len(data) not in counts:
            expected = endpoint.arity_text(counts)
            raise Refusal(422, INVALID_REQUEST, f"data: expected {expected} values, got {len(data)}")

    def _check_stream(self, path: str, scope: Scope) -> None:
        if m := _STREAM.match(path):
            name, event_id = m.group(1), m.group(2)
            if name == "v2":  # /call/v2/<api> without an event id
                raise Refusal(404, UNKNOWN_EVENT, "give the event id: /gradio_api/call/<api>/<event_id>")
            self._named(name)
            if self.held_events is not None and self.held_events(event_id):
                return
            self._known_session(self._session_of_event(event_id), event_id)
        elif _QUEUE_DATA.match(path):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            session = (query.get("session_hash") or [""])[0]
            if not session:
                raise Refusal(422, INVALID_REQUEST, "session_hash: is required")
            self._known_session(session, session)

    def _session_of_event(self, event_id: str) -> str:
        """The session Gradio's stream route reads for ``event_id`` (the rule of routes.py),
        for an event that is queued, running, or finished with its result not yet read."""
        queue = self.blocks._queue
        event = queue.event_ids_to_events.get(event_id)
        if event is not None:
            return event.session_hash
        for session, ids in list(queue.pending_event_ids_session.items()):
            if event_id in ids:
                return session
        # Unknown, or finished and read: Gradio would stream heartbeats forever (or break off).
        raise Refusal(404, UNKNOWN_EVENT, f"no event {short(event_id)} (finished, or never started)")

    def _known_session(self, session: str, shown: str) -> None:
        if session not in self.blocks._queue.pending_messages_per_session:
            raise Refusal(404, UNKNOWN_EVENT, f"no event or session {short(shown)} (finished, or never started)")


class _Forward:
    """Runs the app for one request with ``send`` wrapped: the safety net of the module docstring."""

    HELD_BYTES = 64 * 1024

    def __init__(self, app: ASGIApp, scope: Scope, method: str, path: str) -> None:
        self.app, self.scope, self.method, self.path = app, scope, method, path
        self.started = False
        self.complete = False
        self.event_stream = False
        self.held: Message | None = None  # a 500's start, kept until its body is seen
        self.held_body = b""

    async def __call__(self, receive: Receive, send: Send) -> None:
        self.send = send
        try:
            await self.app(self.scope, receive, self._send)
        except Exception as exc:
            await self._after_exception(exc)

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if message["status"] == 500:
                self.held = message
                return
            self.started = True
            self.event_stream = _content_type(message).startswith(b"text/event-stream")
            await self.send(message)
            return
        if kind != "http.response.body":
            await self.send(message)
            return
        if self.held is not None:
            self.held_body += message.get("body", b"")[: self.HELD_BYTES]
            if not message.get("more_body", False):
                await self._rewrite_500()
            return
        if self.event_stream and message.get("body"):
            message = {**message, "body": titled_error_events(message["body"])}
        await self.send(message)
        if not message.get("more_body", False):
            self.complete = True

    async def _rewrite_500(self) -> None:
        status, title, text = 500, SERVER_ERROR, "the server failed on this request"
        doc: dict[str, Any] | None = None
        try:
            parsed = json.loads(self.held_body)
            doc = parsed if isinstance(parsed, dict) else None
        except ValueError:
            pass
        if doc is not None and isinstance(doc.get("title"), str) and "error" in doc:
            # A gr.Error the /run/ route answered with 500: its title says what it was.
            title = doc["title"]
            status = _TITLE_STATUS.get(title, 400)
            text = str(doc.get("error") or title)
        else:
            log.warning("%s %s: the app answered 500", self.method, self.path)
        body = {**(doc or {}), "title": title, "message": text}
        self.held = None
        self.started = True
        await send_problem(self.send, status, title, text, body)
        self.complete = True

    async def _after_exception(self, exc: Exception) -> None:
        if self.complete:
            log.debug("%s %s: %s after the reply was sent", self.method, self.path, type(exc).__name__)
            return
        if _is_client_error(exc):
            log.info("%s %s: stream ended: %s", self.method, self.path, type(exc).__name__)
        else:
            log.error("%s %s: %s", self.method, self.path, short(exc, 200), exc_info=exc)
        if not self.started:
            self.held = None
            self.started = True
            await send_problem(self.send, 500, SERVER_ERROR, "the server failed on this request")
        elif self.event_stream:
            data = json.dumps({"error": "the stream ended unexpectedly", "title": STREAM_ERROR})
            await self.send(
                {"type": "http.response.body", "body": f"event: error\ndata: {data}\n\n".encode(), "more_body": True}
            )
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        self.complete = True


def _is_client_error(exc: BaseException) -> bool:
    """An HTTPException 4xx (e.g. Gradio's "session not found" inside a stream), also
    when anyio wrapped it in an exception group."""
    inner = getattr(exc, "exceptions", None)
    if inner:
        return all(_is_client_error(e) for e in inner)
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500


def titled_error_events(chunk: bytes) -> bytes:
    """Give every ``event: error`` in an SSE chunk a ``title`` (Gradio's own stream errors
    carry a bare string, and a crash on a tier without ``show_error`` carries ``{"error": null}``)."""
    if b"event: error" not in chunk:
        return chunk
    out = []
    for block in chunk.split(b"\n\n"):
        lines = block.split(b"\n")
        if len(lines) == 2 and lines[0] == b"event: error" and lines[1].startswith(b"data: "):
            try:
                data = json.loads(lines[1][6:])
            except ValueError:
                data = lines[1][6:].decode("utf-8", "replace")
            if isinstance(data, dict) and not data.get("title"):  # a crash, told as Gradio tells it
                data = {**data, "title": SERVER_ERROR, "error": str(data.get("error") or "the request failed")}
                block = b"event: error\ndata: " + json.dumps(data).encode()
            elif not isinstance(data, dict):  # Gradio's own stream errors: a bare string
                data = {"title": STREAM_ERROR, "error": str(data or "the stream failed")}
                block = b"event: error\ndata: " + json.dumps(data).encode()
        out.append(block)
    return b"\n\n".join(out)


async def send_problem(
    send: Send,
    status: int,
    title: str,
    message: str,
    body: dict[str, Any] | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """A JSON error reply ``{"title", "message"}`` (plus ``body``'s other keys, if given),
    with ``headers`` besides its own (``Retry-After``, say)."""
    payload = json.dumps(body if body is not None else {"title": title, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return ""


def _is_form(scope: Scope) -> bool:
    return _header(scope, b"content-type").lower().startswith(("multipart/", "application/x-www-form-urlencoded"))


def _content_type(message: Message) -> bytes:
    for key, value in message.get("headers", []):
        if key.lower() == b"content-type":
            return bytes(value).lower()
    return b""


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the real messages
    (the disconnect that streaming routes wait for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refusal(400, MALFORMED, "the body must be JSON") from None


def _json_object(body: bytes) -> dict[str, Any]:
    doc = _json(body)
    if not isinstance(doc, dict):
        raise Refusal(422, INVALID_REQUEST, f"body: must be a JSON object, got {type(doc).__name__}")
    return doc


_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "session_hash": (str,),
    "event_id": (str,),
    "oauth_token": (str,),
    "fn_index": (int,),
    "trigger_id": (int,),
    "simple_format": (bool,),
    "batched": (bool,),
}


def _predict_body(body: bytes) -> dict[str, Any]:
    """Gradio's ``PredictBody`` shape, checked here so that a wrong type is our 422 (naming
    the field, echoing nothing) rather than FastAPI's (which echoes the whole input)."""
    doc = _json_object(body)
    if not isinstance(doc.get("data"), list):
        raise Refusal(422, INVALID_REQUEST, "data: must be a list of the endpoint's input values")
    for name, types in _OPTIONAL_FIELDS.items():
        value = doc.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
            raise Refusal(422, INVALID_REQUEST, f"{name}: must be {types[0].__name__}, got {short(value)}")
    return doc
