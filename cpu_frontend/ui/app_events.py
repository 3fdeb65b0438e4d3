"""The developer's app on the frontend: each ``@splitspace.gpu`` event forwards its calls.

Gradio serves the app's page and API as its own (the page, View API, ``gradio_client``,
the queue); only the function behind each GPU event changes, in place, to a handler that
follows the call through the frontend (``FrontendCore.follow_call``: identity, validation, the
fair door, the hop) and the GPU tier. For that event:

- ``preprocess=False``: the handler gets Gradio's API payloads (Gradio has still checked
  them against the components' data models and moved uploaded files into its cache); the
  GPU tier's components preprocess them;
- ``postprocess=False``: the handler returns the GPU tier's postprocessed payloads;
- no concurrency limit and no Gradio batching: the door and the GPU tier's scheduler
  decide who goes when, and the GPU tier batches across clients;
- the handler is a generator: while the call waits it sends no output and tells its
  place through Gradio's progress (``gr.Progress``), so a client iterating the outputs
  sees only the function's (were Gradio's liveness out of reach, it would yield
  ``gr.skip()`` at each status instead, the way Gradio notices a caller who left); a generator function's
  each yield arrives as outputs the moment the GPU tier sends it, so Gradio streams it
  (``generating`` events, each replacing the outputs, the last one the result);
- a caller who leaves is noticed within ``LIVENESS_S`` even while nothing arrives (Gradio
  itself would notice only at the handler's next yield: a slow stream's next chunk), and the
  call to the GPU tier is closed, which drops a waiting job or stops a stream.

Events without the decorator run here, as in plain Gradio.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

import gradio as gr

from splitspace.shared.app import ui_text
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.contract.hop import Status, status_for_api
from splitspace.shared.gradio.gradio_events import event_liveness, in_queue

T = TypeVar("T")
LIVENESS_S = 0.1
"""How often a handler waiting for the GPU tier's next update looks whether its caller is still there."""


class Follow(Protocol):
    """A call's statuses, then its outputs (one payload per output component). ``validated``:
    Gradio ran the frontend's checks on these payloads already (the event's validator)."""

    def __call__(
        self, endpoint: GpuEndpoint, payloads: list[Any], request: gr.Request | None, *, validated: bool = False
    ) -> AsyncGenerator[Status | list[Any], None]: ...


def forward_gpu_events(
    endpoints: list[GpuEndpoint],
    follow: Follow,
    validator: Callable[[GpuEndpoint], Callable[..., Any]] | None = None,
    tells_status: Callable[[GpuEndpoint], bool] = lambda endpoint: False,
) -> None:
    """Rewire each GPU event of the app to forward its calls through ``follow``. ``validator``:
    what Gradio's own ``validator=`` of the rewired event becomes, given the endpoint (the
    frontend's checks, ``api/validation.gradio_validator``: Gradio would otherwise run the
    app's validator on raw payloads); None: the event keeps none. ``tells_status``: whether
    the event's API tells each status as its last output (the built-in's ``/generate``: its
    info output, as API clients always read it), else only through Gradio's progress."""
    for endpoint in endpoints:
        block_fn = endpoint.block_fn
        block_fn.fn = forwarding_handler(endpoint, follow, tells_status(endpoint), validator is not None)
        block_fn.validator = validator(endpoint) if validator is not None else None
        block_fn.preprocess = False
        block_fn.postprocess = False
        block_fn.batch = False
        block_fn.concurrency_limit = None
        block_fn.inputs_as_dict = False  # the handler takes every input in order (the GPU tier regroups)
        block_fn.input_keyword_names = []
        block_fn.tracks_progress = True


def forwarding_handler(
    endpoint: GpuEndpoint, follow: Follow, tells_status: bool = False, validates: bool = False
) -> Callable[..., AsyncIterator[Any]]:
    """A Gradio handler for the event: its inputs' payloads, then ``request`` and ``progress``
    (Gradio fills those in by the signature), telling its progress while the call waits, then
    yielding its outputs (each of a stream's as it comes). ``tells_status``: each status is
    yielded too, as the last output (the others empty), for REST clients, who see no progress.
    ``validates``: the event's validator is the frontend's checks, which Gradio runs when it
    queues a call (and only then: a direct ``/run`` call is checked by ``follow``), so a
    queued call is not checked twice."""
    n_out = len(endpoint.outputs)
    waiting: Any = None if n_out == 0 else gr.skip() if n_out == 1 else tuple(gr.skip() for _ in range(n_out))

    async def handler(*args: Any) -> AsyncIterator[Any]:
        *payloads, request, progress = args
        clicked = time.monotonic()
        alive = event_liveness()
        queued = in_queue()  # a direct call (POST /run/...) gets the first yield alone: its outputs
        updates = follow(endpoint, list(payloads), request, validated=validates and queued)
        async with contextlib.aclosing(updates):
            async for update in while_alive(updates, alive or (lambda: True)):
                if isinstance(update, Status):
                    status = status_for_api(update)
                    waited = time.monotonic() - clicked
                    progress(ui_text.wait_fraction(waited, update.eta_s), desc=ui_text.waiting(status))
                    if not queued:
                        continue
                    if tells_status:
                        yield status if n_out == 1 else (*([None] * (n_out - 1)), status)
                    elif alive is None:  # no way to look: a yield is how Gradio notices a caller who left
                        yield waiting
                else:
                    yield update[0] if n_out == 1 else tuple(update)

    signature = inspect.Signature(
        [
            *_input_parameters(endpoint),
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request, default=None),
            inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
        ]
    )
    handler.__signature__ = signature  # type: ignore[attr-defined]
    handler.__annotations__ = {"request": gr.Request}  # what Gradio reads to pass the request
    original = endpoint.record.fn
    handler.__name__ = handler.__qualname__ = getattr(original, "__name__", endpoint.api_name)
    handler.__doc__ = original.__doc__  # the API page's description of the function
    return handler


async def while_alive(items: AsyncIterator[T], alive: Callable[[], bool]) -> AsyncIterator[T]:
    """``items`` until they end or ``alive()`` turns false, looked at every ``LIVENESS_S``
    while the next item is awaited; then that wait is cancelled (which closes ``items``
    where it waits: the call to the GPU tier). Cancelled itself, it cancels the wait too."""
    while True:
        step = asyncio.ensure_future(anext(items))
        try:
            while not (await asyncio.wait({step}, timeout=LIVENESS_S))[0]:
                if not alive():
                    return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
        finally:
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
        yield item


def _input_parameters(endpoint: GpuEndpoint) -> list[inspect.Parameter]:
    """One parameter per input, named as Gradio names them for the API, with the developer's
    defaults where the function has them (so the API page says which are optional)."""
    names = list(endpoint.block_fn.input_parameter_names or [])
    try:
        original = inspect.signature(endpoint.record.fn).parameters
    except (TypeError, ValueError):
        original = {}  # type: ignore[assignment]
    params, seen = [], set()
    for i in range(len(endpoint.inputs)):
        name = names[i] if i < len(names) else None
        if not (isinstance(name, str) and name.isidentifier()) or name in seen or name in ("request", "progress"):
            name = f"param_{i}"
        seen.add(name)
        default = original[name].default if name in original else inspect.Parameter.empty
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    try:
        inspect.Signature(params)
    except ValueError:  # a default before a parameter without one (keyword inputs moved last): drop them
        params = [p.replace(default=inspect.Parameter.empty) for p in params]
    return params
