"""A pooled async transport that speaks Gradio's documented REST queue protocol over httpx.

One ``httpx.AsyncClient`` per GPU tier keeps connections alive across calls
(the stock ``gradio_client`` opens a new client and TLS context per call and
polls with sleeps). A call is ``POST /gradio_api/call/<api>`` then ``GET`` of
its event stream; every ``generating`` event is relayed as it arrives. A
caller who leaves early gets its call cancelled on the GPU tier at once with
``POST /gradio_api/cancel`` (for a ``/call`` event, the session is the event
itself, so this cancels that call alone), rather than waiting for the GPU
tier to notice the closed stream at its next status update.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from shared.errors import QUEUE_FULL, BackendUnavailable, Throttled

from .hub_auth import backend_auth_headers
from .transport import NotStarted, Transport, error_from_backend, fetch_health


class HttpxTransport(Transport):
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
        self._fn_index: dict[str, int] = {}
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            headers=backend_auth_headers(),  # the frontend Space's Hub token, for a private GPU Space
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=100),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def health(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return await fetch_health(self._client, self.base_url, headers)

    async def _join(self, api_name: str, data: list[Any], headers: dict[str, str]) -> str:
        try:
            r = await self._client.post(
                f"{self.base_url}/gradio_api/call/{api_name}", json={"data": data}, headers=headers
            )
        except httpx.HTTPError as exc:
            raise NotStarted(f"cannot reach the GPU tier: {type(exc).__name__}") from exc
        if r.status_code == 503:
            raise Throttled(QUEUE_FULL, "the GPU tier's queue is full", 5)
        if r.status_code != 200:
            raise NotStarted(f"the GPU tier answered HTTP {r.status_code}")
        try:
            return str(r.json()["event_id"])
        except (ValueError, KeyError) as exc:
            raise NotStarted("the GPU tier sent no event id") from exc

    async def stream(
        self, api_name: str, data: list[Any], headers: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        event_id = await self._join(api_name, data, headers)
        url = f"{self.base_url}/gradio_api/call/{api_name}/{event_id}"
        finished = False
        try:
            async with self._client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise BackendUnavailable(f"the GPU tier's event stream answered HTTP {resp.status_code}")
                event = ""
                async for line in resp.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        payload = line[5:].strip()
                        if event == "generating":
                            update = _first(payload)
                            if update.get("status") == "done":  # the result; "complete" repeats it
                                finished = True
                                yield update
                                return
                            yield update
                        elif event == "complete":
                            finished = True
                            final = _first(payload)
                            if not final:  # cancelled on the GPU tier
                                raise BackendUnavailable("the GPU tier cancelled the request")
                            yield final
                            return
                        elif event == "error":
                            finished = True
                            raise error_from_backend(_error_text(payload))
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"lost the GPU tier mid-request: {type(exc).__name__}") from exc
        finally:
            if not finished:
                await self._cancel(api_name, event_id)
        raise BackendUnavailable("the GPU tier closed the stream without a result")

    async def _cancel(self, api_name: str, event_id: str) -> None:
        """Best effort: the GPU tier also notices the closed stream, only later."""
        try:
            fn_index = await self._fn_index_of(api_name)
            await self._client.post(
                f"{self.base_url}/gradio_api/cancel",
                json={"session_hash": event_id, "fn_index": fn_index, "event_id": event_id},
                timeout=2.0,
            )
        except (httpx.HTTPError, KeyError, ValueError):
            pass

    async def _fn_index_of(self, api_name: str) -> int:
        if api_name not in self._fn_index:
            config = (await self._client.get(f"{self.base_url}/config")).json()
            for dep in config["dependencies"]:
                if dep.get("api_name"):
                    self._fn_index[dep["api_name"]] = int(dep["id"])
        return self._fn_index[api_name]


def _first(payload: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except ValueError:
        return {}
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data[0]
    return {}


def _error_text(payload: str) -> str | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    if isinstance(data, dict):
        return data.get("error")
    return str(data) if data is not None else None
