"""The default transport: one pooled httpx request per call to the GPU tier's direct route.

``POST /splitspace/v1/infer`` with the request as JSON, answered with one JSON
line per status update and a last line with the result
(``gpu_backend/direct_route.py``). Compared with Gradio's queue protocol
(``httpx_transport.py``: a join request, then an event stream, then a cancel
request when the caller leaves) this is one request per call, and leaving is
closing it: the GPU tier drops the queued job the moment the connection
closes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from shared.errors import BackendUnavailable, from_wire

from .transport import NotStarted, Transport, fetch_health, pooled_client

PATHS = {"infer": "/splitspace/v1/infer", "standing": "/splitspace/v1/standing"}
FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed")
"""The order of ``data`` for ``infer``, as for Gradio's positional ``/infer``."""


class DirectTransport(Transport):
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        client: httpx.AsyncClient | None = None,
        max_connections: int = 1000,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._client = client or pooled_client(timeout_s, max_connections)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def health(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return await fetch_health(self._client, self.base_url, headers)

    async def stream(
        self, api_name: str, data: list[Any], headers: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        body = dict(zip(FIELDS, data)) if api_name == "infer" else {}
        request = self._client.build_request("POST", self.base_url + PATHS[api_name], json=body, headers=headers)
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:  # no answer: the GPU tier never took the call
            raise NotStarted(f"cannot reach the GPU tier: {type(exc).__name__}") from exc
        try:
            if resp.status_code != 200:
                raise await _refusal(resp)
            if not resp.headers.get("content-type", "").startswith("application/x-ndjson"):
                yield json.loads(await resp.aread())  # a single JSON document (standing)
                return
            last = None
            async for line in resp.aiter_lines():
                if line:
                    update = json.loads(line)
                    if update.get("status") in ("done", "error"):
                        # The body ends right after this line; reading on to its end gives
                        # the connection back to the pool instead of closing it.
                        last = update
                    else:
                        yield update
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"lost the GPU tier mid-request: {type(exc).__name__}") from exc
        except ValueError as exc:
            raise BackendUnavailable("the GPU tier sent a malformed answer") from exc
        finally:
            await resp.aclose()  # before the result arrived: closing it cancels the job
        if last is not None and last["status"] == "error":
            raise from_wire(last)
        if last is not None:
            yield last
            return
        raise BackendUnavailable("the GPU tier closed the stream without a result")


async def _refusal(resp: httpx.Response) -> Exception:
    """The error for a non-200 answer: the GPU tier's own (401, 422, 429) or NotStarted."""
    await resp.aread()
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "title" in doc and resp.status_code in (401, 422, 429):
        return from_wire(doc)
    # Anything else (a proxy's 502, a Space still starting) means the call was not taken.
    return NotStarted(f"the GPU tier answered HTTP {resp.status_code}")
