"""A transport that calls Python functions instead of a GPU tier (as httpx ships ``MockTransport``).

For tests of the frontend and for trying it without a GPU tier. Given the app's GPU events
(``functions=gpu_endpoints(blocks)``, read before the frontend rewires them), it runs each
call of a ``@splitspace.gpu`` function in-process as the GPU tier would
(``shared/app/processing.py``: preprocess, the function, postprocess, files carried as
bytes; a generator's each yield as a Partial, stopped when the call is closed), with no
token check, queue or fairness; a function's error arrives as the GPU tier would send it::

    frontend = build_app(settings, transports=[MockTransport(functions=gpu_endpoints(load_app(spec)))])

Or a ``call_handler`` answers each call itself (a scripted GPU tier: statuses, partials, a
result, or the project's errors raised), which reach the caller exactly as a real
transport's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from typing import Any, cast

from gradio import utils as gr_utils
from gradio.exceptions import Error as GradioError

from splitspace.cpu_frontend.hop.transport import Transport
from splitspace.shared.app.files import DEFAULT_MAX_FILE_BYTES
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.app.processing import EventProcessing
from splitspace.shared.app.streaming import Stopped
from splitspace.shared.contract.calls import Call, CallInfo, CallResult, Partial
from splitspace.shared.contract.errors import GPU_ERROR, GpuFailed, SplitspaceError, UnknownEndpoint
from splitspace.shared.contract.hop import CallUpdate

CallHandler = Callable[[Call, Mapping[str, str]], "Iterable[CallUpdate] | AsyncIterator[CallUpdate]"]
"""Answers a developer function's call itself: a scripted GPU tier (statuses, partials, a result)."""


class MockTransport(Transport):
    def __init__(
        self,
        *,
        base_url: str = "mock://gpu-tier",
        standing: Callable[[Mapping[str, str]], dict[str, Any]] | None = None,
        health: dict[str, Any] | None = None,
        functions: Iterable[GpuEndpoint] = (),
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        call_handler: CallHandler | None = None,
    ) -> None:
        self.base_url = base_url
        self._functions = {e.api_name: EventProcessing.of(e) for e in functions}
        self._max_file_bytes = max_file_bytes
        self._call_handler = call_handler
        self.calls: list[tuple[Call, dict[str, str]]] = []
        """Every call and its headers, in order."""
        self._standing = standing or (lambda headers: {"tier": "anonymous", "queued": 0, "running": 0})
        self._health = health or {
            "status": "ok",
            "model": "mock",
            "placeholder_model": True,
            "defaults": {"steps": 1, "guidance_scale": 0.0},
        }

    async def call(self, call: Call, headers: Mapping[str, str]) -> AsyncGenerator[CallUpdate, None]:
        self.calls.append((call, dict(headers)))
        if self._call_handler is not None:  # a scripted GPU tier: its updates as they are
            scripted = self._call_handler(call, headers)
            if inspect.isasyncgen(scripted):
                async for update in cast(AsyncIterator[CallUpdate], scripted):
                    yield update
            else:
                for update in cast(Iterable[CallUpdate], scripted):
                    yield update
            return
        event = self._functions.get(call.endpoint)
        if event is None:
            raise UnknownEndpoint(f"no function named {call.endpoint!r} (functions: {', '.join(self._functions)})")
        t0 = time.monotonic()
        try:
            args = await asyncio.to_thread(
                event.preprocess, call.data, cache_dir=gr_utils.get_upload_folder(), max_file_bytes=self._max_file_bytes
            )
            data: list[Any] | None = None
            if event.streams:
                async for item in self._stream(event, args):
                    if isinstance(item, Partial):
                        yield item
                    else:
                        data = item
                assert data is not None
            else:
                outputs = await asyncio.to_thread(event.call, args)
                data = await event.postprocess(outputs, max_file_bytes=self._max_file_bytes)
        except SplitspaceError:
            raise
        except GradioError as exc:  # as the GPU tier passes a function's gr.Error on
            raise SplitspaceError(str(exc.message), title=exc.title or GPU_ERROR) from None
        except Exception as exc:
            raise GpuFailed(f"the function failed ({type(exc).__name__})") from None
        spent = round(time.monotonic() - t0, 4)
        yield CallResult(data, CallInfo(endpoint=call.endpoint, queue_s=0.0, gpu_s=spent, total_s=spent, client="mock"))

    async def _stream(self, event: EventProcessing, args: list[Any]) -> AsyncIterator[Partial | list[Any]]:
        """A generator's yields as Partials, then its last yield's payloads; run in a thread,
        stopped when this is closed."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def emit(data: list[Any]) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, ("partial", data))

        def run() -> None:
            try:
                last = event.call_streaming(args, emit, should_stop=stop.is_set, max_file_bytes=self._max_file_bytes)
            except Stopped:
                return
            except BaseException as exc:  # noqa: BLE001 (the caller gets it, as the GPU tier's error)
                loop.call_soon_threadsafe(updates.put_nowait, ("error", exc))
            else:
                loop.call_soon_threadsafe(updates.put_nowait, ("done", last))

        worker = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            while True:
                kind, value = await updates.get()
                if kind == "partial":
                    yield Partial(value)
                elif kind == "error":
                    raise value
                else:
                    yield value
                    return
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await worker

    async def standing(self, headers: Mapping[str, str]) -> dict[str, Any]:
        return self._standing(headers)

    async def health(self, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        return dict(self._health)
