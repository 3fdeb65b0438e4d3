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
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx

from splitspace.cpu_frontend.hop.transport import GradioEndpointTransport, NotStarted, fetch_health
from splitspace.shared.contract.errors import QUEUE_FULL, BackendUnavailable, GpuFailed, Throttled


class HttpxTransport(GradioEndpointTransport):
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        client: httpx.AsyncClient | None = None,
        max_connections: int = 1000,
        auth_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._fn_index: dict[str, int] = {}
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            headers=dict(auth_headers or {}),  # the frontend Space's Hub token, for a private GPU Space
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=100),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def health(self, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await fetch_health(self._client, self.base_url, headers)

    async def _join(self, api_name: str, data: list[Any], headers: Mapping[str, str]) -> str:
        try:
            r = await self._client.post(
                f"{self.base_url}/gradio_api/call/{api_name}", json={"data": data}, headers=dict(headers)
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

    async def _call(self, api_name: str, data: list[Any], headers: Mapping[str, str]) -> AsyncGenerator[Any, None]:
        """Each value the GPU tier's handler yields, in order, ending with its last one.

        The GPU tier's handlers send an error as a last value (``{"status": "error",
        ...}``, decoded by the caller) before Gradio's own ``error`` event, whose text
        is used only when no such value came (an error of Gradio itself)."""
        event_id = await self._join(api_name, data, headers)
        url = f"{self.base_url}/gradio_api/call/{api_name}/{event_id}"
        finished = False
        last: Any = None
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
                            last = _first(payload)
                            if isinstance(last, dict) and last.get("status") in ("done", "error"):
                                finished = True  # the result; "complete" would repeat it
                                yield last
                                return
                            yield last
                        elif event == "complete":
                            finished = True
                            final = _first(payload)
                            if final is None:  # cancelled on the GPU tier
                                raise BackendUnavailable("the GPU tier cancelled the request")
                            yield final
                            return
                        elif event == "error":
                            finished = True
                            raise GpuFailed(_error_text(payload))
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


def _first(payload: str) -> Any:
    """The first output of a Gradio event's data (our handlers have one output)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data[0] if isinstance(data, list) and data else None


def _error_text(payload: str) -> str:
    try:
        data = json.loads(payload)
    except ValueError:
        data = payload
    if isinstance(data, dict):
        data = data.get("error")
    return (str(data) if data is not None else "the GPU tier failed without a message")[:300]
