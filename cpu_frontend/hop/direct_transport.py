"""The frontend's transport: one pooled aiohttp request per call to the GPU tier's direct route.

``POST /splitspace/v1/call`` with a call of a developer's function as a frame (its files'
bytes after its JSON, ``shared/contract/frames.py``), answered with one frame per status
update and a last one with the result (``gpu_backend/serving/direct_route.py``). Compared with Gradio's
queue protocol (a join request, then an event stream, then a cancel request when the
caller leaves) this is one request per call, and leaving is closing it: the GPU tier
drops the queued job the moment the connection closes.

aiohttp rather than httpx: this hop is the frontend's main cost per call, and
aiohttp's client spends about a third of httpx's CPU on a streamed request (0.23
against 0.68 ms on this project's 2-core machine, uvloop, keep-alive; ``bench/hop.py``
shows the effect on the whole frontend).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp

from splitspace.cpu_frontend.hop.transport import NotStarted, Transport
from splitspace.shared.contract import frames
from splitspace.shared.contract.calls import CALL_PATH, Call
from splitspace.shared.contract.errors import NOT_FOUND, SERVICE_UNAVAILABLE, BackendUnavailable, from_wire
from splitspace.shared.contract.hop import CallUpdate, call_update_from_wire

KEEPALIVE_S = 4.0
STANDING_PATH = "/splitspace/v1/standing"


class DirectTransport(Transport):
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        max_connections: int = 1000,
        auth_headers: Mapping[str, str] | None = None,
    ) -> None:
        """``auth_headers``: sent with every call, the same for all (the frontend Space's
        Hub token for a private GPU Space, see ``hub_auth.py``)."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._auth_headers = dict(auth_headers or {})
        self._session: aiohttp.ClientSession | None = None

    def _pool(self) -> aiohttp.ClientSession:
        """One keep-alive pool per GPU tier, made on first use (it belongs to the running loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # Connecting and every read are bounded; the whole call is not (a job may
                # wait its turn for minutes, with a status line every few seconds).
                # Reads are bounded by _chunks (a busy event loop must not pass for a silent GPU
                # tier); connecting and the answer's start by _post.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=None),
                # keep-alive shorter than the GPU tier's (uvicorn: 5 s), so a pooled connection
                # is not reused just as the server closes it
                connector=aiohttp.TCPConnector(
                    limit=self.max_connections, limit_per_host=self.max_connections, keepalive_timeout=KEEPALIVE_S
                ),
                headers=self._auth_headers,
                raise_for_status=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def health(self, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        try:
            async with self._pool().get(f"{self.base_url}/health", headers=headers) as resp:
                if resp.status != 200:
                    raise BackendUnavailable(f"{self.base_url} answered its health check with HTTP {resp.status}")
                return await resp.json()
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise BackendUnavailable(f"{self.base_url} did not answer its health check") from exc

    async def standing(self, headers: Mapping[str, str]) -> dict[str, Any]:
        try:
            async with self._pool().post(self.base_url + STANDING_PATH, json={}, headers=headers) as resp:
                if resp.status != 200:
                    raise await _refusal(resp)
                return await resp.json()
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise BackendUnavailable(f"lost the GPU tier mid-request: {type(exc).__name__}") from exc

    async def _post(
        self, path: str, body: dict[str, Any] | bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """POST, trying a second connection once when the first fails before any answer: a
        pooled keep-alive connection the GPU tier has just closed fails that way, and
        under a crowd many do. Never a double run: a call that did reach the GPU tier
        used up its one-call token, and the second try is refused."""
        for attempt in (1, 2):
            try:
                post = (
                    self._pool().post(self.base_url + path, json=body, headers=headers)
                    if isinstance(body, dict)
                    else self._pool().post(
                        self.base_url + path, data=body, headers={**headers, "content-type": frames.FRAME_TYPE}
                    )
                )
                return await asyncio.wait_for(post, self.timeout_s)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                if attempt == 2 or isinstance(exc, asyncio.TimeoutError):
                    raise NotStarted(f"cannot reach the GPU tier: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    async def call(self, call: Call, headers: Mapping[str, str]) -> AsyncGenerator[CallUpdate, None]:
        body = await asyncio.to_thread(frames.encode, call.to_wire())  # the call's files: megabytes, maybe
        docs = self._docs(CALL_PATH, body, headers)
        async with contextlib.aclosing(docs):
            async for doc in docs:
                yield call_update_from_wire(doc)  # the CallResult last, or the error line's error raised

    async def _docs(
        self, path: str, body: dict[str, Any] | bytes, headers: Mapping[str, str]
    ) -> AsyncGenerator[Any, None]:
        """Each line of the GPU tier's answer, the last (done or error) included."""
        resp = await self._post(path, body, headers)
        final: dict[str, Any] | None = None
        try:
            if resp.status != 200:
                raise await _refusal(resp)
            async for doc in _documents(resp, self.timeout_s):
                if isinstance(doc, dict) and doc.get("status") in ("done", "error"):
                    # The body ends right after this line; reading on to its end gives
                    # the connection back to the pool instead of closing it.
                    final = doc
                else:
                    yield doc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BackendUnavailable(f"lost the GPU tier mid-request: {type(exc).__name__}") from exc
        except ValueError as exc:  # (frames.BadFrame too)
            raise BackendUnavailable("the GPU tier sent a malformed answer") from exc
        finally:
            if final is None:
                resp.close()  # the caller left (or the call failed): closing it cancels the job
            else:
                resp.release()
        if final is None:
            raise BackendUnavailable("the GPU tier closed the stream without a result")
        yield final


async def _documents(resp: aiohttp.ClientResponse, silence_s: float) -> AsyncIterator[Any]:
    """Each frame of the body as its document, files in place (``frames.decode``). Cut here,
    not with aiohttp's line reader, whose line length is capped (the built-in's result line
    carries the whole PNG) and which knows nothing of a frame's blobs."""
    splitter = frames.FrameSplitter()
    async for chunk in _chunks(resp, silence_s):
        for frame in splitter.feed(chunk):
            yield await _decoded(frame)
    last = splitter.end()
    if last is not None:
        yield await _decoded(last)


async def _decoded(frame: frames.RawFrame) -> Any:
    if frame.small:
        return frames.decode(frame)
    return await asyncio.to_thread(frames.decode, frame)


async def _chunks(resp: aiohttp.ClientResponse, silence_s: float) -> AsyncIterator[bytes]:
    """The body as it arrives; BackendUnavailable when the GPU tier says nothing for
    ``silence_s`` (it sends a status at least every few seconds while a job waits).

    On a saturated event loop (a crowd arriving) a timer can run before the data that came
    in time is read (uvloop runs timers first): one more look before calling the GPU tier
    silent, or a crowd's heartbeats would read as a dead GPU tier."""
    while True:
        try:
            chunk = await asyncio.wait_for(resp.content.readany(), silence_s)
        except TimeoutError:
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), 1.0)
            except TimeoutError:
                raise BackendUnavailable(f"no word from the GPU tier for {silence_s:g} s") from None
        if not chunk:
            return
        yield chunk


async def _refusal(resp: aiohttp.ClientResponse) -> Exception:
    """The error for a non-200 answer: the GPU tier's own (401, 422, 429) or NotStarted."""
    try:
        doc = json.loads(await resp.read())
    except ValueError:
        doc = None
    if (
        isinstance(doc, dict)
        and "title" in doc
        and (
            resp.status in (401, 422, 429)
            or (resp.status == 503 and doc["title"] == SERVICE_UNAVAILABLE)
            or (resp.status == 404 and doc["title"] == NOT_FOUND)
        )
    ):
        return from_wire(doc)  # the GPU tier's own refusal (503: its shared state is down; 404: no such function)
    # Anything else (a proxy's 502, a Space still starting) means the call was not taken.
    return NotStarted(f"the GPU tier answered HTTP {resp.status}")
