"""The stock transport: one shared ``gradio_client.Client`` (the design card's path).

Kept supported and tested because it is what most two-tier Spaces use. Per
user values (the identity token, ``x-ip-token``) go in each call's
``headers=``, never in the Client's constructor, whose headers would win
over them (gradio_client's ``client.py``: ``headers = {**request_headers, **self.headers}``).
The client is built from the URL, never a
Space id, so it never stores one user's ``x-ip-token`` for everyone.
It is thread based: each call waits in a worker thread and is polled here. It
cannot cancel one call: Gradio's cancel works per session and endpoint, and all
calls through one Client share a session (see ``stream``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx
from gradio_client import Client
from gradio_client.exceptions import AppError

from splitspace.cpu_frontend.hop.transport import GradioEndpointTransport, NotStarted, fetch_health
from splitspace.shared.contract.errors import BackendUnavailable, GpuFailed, SplitspaceError

POLL_S = 0.02
_CANCELLED = object()


def _result_of(job: Any, timeout_s: float) -> Any:
    """``job.result()``, or _CANCELLED when gradio_client cancelled the job's future: its
    concurrent.futures.CancelledError must not reach asyncio, which would turn it into
    a cancellation of the caller's own task (and Gradio would then never answer it)."""
    try:
        return job.result(timeout_s)
    except concurrent.futures.CancelledError:
        return _CANCELLED


log = logging.getLogger("splitspace.frontend")


class GradioClientTransport(GradioEndpointTransport):
    def __init__(
        self, base_url: str, *, timeout_s: float = 10.0, auth_headers: Mapping[str, str] | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._auth_headers = dict(auth_headers or {})
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._health_http = httpx.AsyncClient(timeout=timeout_s, headers=self._auth_headers)

    def _get_client(self) -> Client:
        with self._lock:
            if self._client is None:
                try:
                    self._client = Client(
                        self.base_url + "/",
                        verbose=False,
                        download_files=False,
                        analytics_enabled=False,
                        httpx_kwargs={"timeout": self.timeout_s},
                        headers=self._auth_headers,  # same for every call: the frontend's Hub token
                    )
                except Exception as exc:  # connection refused, bad config ...
                    raise NotStarted(f"cannot reach the GPU tier: {type(exc).__name__}") from exc
            return self._client

    async def aclose(self) -> None:
        await self._health_http.aclose()
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    async def health(self, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await fetch_health(self._health_http, self.base_url, headers)

    async def _call(self, api_name: str, data: list[Any], headers: Mapping[str, str]) -> AsyncGenerator[Any, None]:
        """Each value the GPU tier's handler yields, then its result. The GPU tier's handlers
        send an error as a last value before Gradio's own error, whose text is used only
        when no such value came (an error of Gradio itself)."""
        client = await asyncio.to_thread(self._get_client)
        try:
            job = await asyncio.to_thread(client.submit, *data, api_name=f"/{api_name}", headers=dict(headers))
        except Exception as exc:
            raise NotStarted(f"cannot reach the GPU tier: {type(exc).__name__}") from exc
        seen = 0
        finished = False
        loop = asyncio.get_running_loop()
        last_news = loop.time()
        try:
            while True:
                done = job.done()
                outputs = job.outputs()
                for out in outputs[seen:]:
                    if isinstance(out, dict) and out.get("status") == "error":
                        finished = True
                        yield out
                        return
                    if isinstance(out, dict) and out.get("status") != "done":
                        yield out
                if len(outputs) > seen:
                    seen, last_news = len(outputs), loop.time()
                if done:
                    break
                if loop.time() - last_news > self.timeout_s:  # the GPU tier went silent
                    raise BackendUnavailable(f"no word from the GPU tier for {self.timeout_s:g} s")
                await asyncio.sleep(POLL_S)
            try:
                result = await asyncio.to_thread(_result_of, job, self.timeout_s)
            except AppError as exc:
                raise GpuFailed(str(exc.message)[:300]) from None
            except SplitspaceError:
                raise
            except Exception as exc:
                raise BackendUnavailable(f"lost the GPU tier mid-request: {type(exc).__name__}") from exc
            finished = True
            if result is _CANCELLED:
                raise BackendUnavailable("the GPU tier's client cancelled the request")
            if result is None:
                raise BackendUnavailable("the GPU tier cancelled the request")
            yield result
        finally:
            if not finished and not job.done():
                # Abandon, never job.cancel(): Gradio cancels by session and endpoint, and
                # every call through this shared Client has the same session, so one
                # caller's cancel would cancel everyone's. The GPU tier runs this job anyway.
                log.info("caller left; the gradio_client transport cannot cancel a single call")
