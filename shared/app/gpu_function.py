"""``@splitspace.gpu``: marks a function of an ordinary Gradio app to run on the GPU tier.

It is the one change a developer makes to a ZeroGPU app (``@spaces.GPU`` becomes
``@splitspace.gpu``). The decorated function stays an ordinary callable with the same
signature, so ``python app.py`` still runs it in one process, as plain Gradio would. What
the decorator adds is a :class:`GpuFunction` record that the tiers read:

- the frontend (``splitspace frontend --app``) finds each decorated function among the
  app's events and forwards its calls to the GPU tier with the caller's signed identity;
- the GPU tier (``splitspace backend --app``) serves only the decorated functions, behind
  its fair scheduler, and calls them under ``spaces.GPU`` on ZeroGPU.

``duration`` is what ZeroGPU takes: a number of seconds, or a function of the call's
inputs that returns one. splitspace uses it as the admission estimate, then settles the
client's account with the GPU time the call measured.

A generator function (sync or async) streams: each yield reaches every client as it is
produced (Gradio's semantics: each yield replaces the outputs, the last one is the
result). ``time_limit`` (seconds on the GPU; else the event's own ``time_limit``) stops a
generator that runs past it, at its next yield, with a "Time limit" error that names it,
and frees the GPU; its caller is charged the time it used.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DURATION_S = 60.0
"""ZeroGPU's default ``duration`` (seconds), used when the decorator is given none."""
ATTRIBUTE = "__splitspace_gpu__"
"""Where a decorated function keeps its :class:`GpuFunction` record."""

Duration = float | Callable[..., float]


@dataclass(frozen=True)
class GpuFunction:
    """What the tiers know of one decorated function."""

    fn: Callable[..., Any]
    """The developer's function, undecorated."""
    duration: Duration = DEFAULT_DURATION_S
    batch: bool = False
    max_batch_size: int = 4
    """With ``batch``: how many calls one invocation takes at most (Gradio's ``max_batch_size``)."""
    time_limit: float | None = None
    """Seconds a generator may run on the GPU before it is stopped (None: the event's ``time_limit``, if any)."""

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "fn")

    @property
    def is_generator(self) -> bool:
        return inspect.isgeneratorfunction(self.fn) or inspect.isasyncgenfunction(self.fn)

    def estimate_s(self, *args: Any) -> float:
        """The admission estimate for one call with these (preprocessed) inputs, in seconds.
        A ``duration`` function that fails or answers nonsense falls back to the default, as
        a wrong estimate is settled by the measured time anyway."""
        if not callable(self.duration):
            return float(self.duration)
        try:
            value = float(self.duration(*args))
        except Exception:
            return DEFAULT_DURATION_S
        return value if value > 0 and value == value and value != float("inf") else DEFAULT_DURATION_S


@overload
def gpu(fn: F, /) -> F: ...
@overload
def gpu(
    fn: None = None,
    /,
    *,
    duration: Duration = DEFAULT_DURATION_S,
    batch: bool = False,
    max_batch_size: int = 4,
    time_limit: float | None = None,
) -> Callable[[F], F]: ...
def gpu(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    duration: Duration = DEFAULT_DURATION_S,
    batch: bool = False,
    max_batch_size: int = 4,
    time_limit: float | None = None,
) -> Any:
    """Mark ``fn`` to run on the GPU tier: ``@splitspace.gpu`` or ``@splitspace.gpu(duration=...)``."""
    if isinstance(duration, bool) or not (callable(duration) or (isinstance(duration, int | float) and duration > 0)):
        raise ValueError("duration must be a positive number of seconds or a function of the inputs")
    if batch and (not isinstance(max_batch_size, int) or max_batch_size < 1):
        raise ValueError("max_batch_size must be a positive integer")
    if time_limit is not None and (
        isinstance(time_limit, bool) or not isinstance(time_limit, int | float) or not 0 < time_limit < float("inf")
    ):
        raise ValueError("time_limit must be a positive number of seconds")

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        inner = gpu_function(f)  # decorated twice: the developer's function is the inner one
        record = GpuFunction(
            inner.fn if inner else f, duration, batch, max_batch_size, None if time_limit is None else float(time_limit)
        )
        wrapped = _plain_call(record)
        setattr(wrapped, ATTRIBUTE, record)
        return wrapped

    return mark(fn) if fn is not None else mark


def _plain_call(record: GpuFunction) -> Callable[..., Any]:
    """The decorated function as an ordinary callable: in one process (``python app.py``)
    it runs the developer's function, under ``spaces.GPU`` (which changes nothing off
    ZeroGPU), as the ZeroGPU app would."""
    target = _on_zerogpu(record)
    if inspect.isasyncgenfunction(record.fn):

        @functools.wraps(record.fn)
        async def agen(*args: Any, **kwargs: Any) -> Any:
            async for item in target(*args, **kwargs):
                yield item

        return agen
    if inspect.isgeneratorfunction(record.fn):

        @functools.wraps(record.fn)
        def gen(*args: Any, **kwargs: Any) -> Any:
            yield from target(*args, **kwargs)

        return gen
    if inspect.iscoroutinefunction(record.fn):

        @functools.wraps(record.fn)
        async def coro(*args: Any, **kwargs: Any) -> Any:
            return await target(*args, **kwargs)

        return coro

    @functools.wraps(record.fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return target(*args, **kwargs)

    return call


def _on_zerogpu(record: GpuFunction) -> Callable[..., Any]:
    """``spaces.GPU(duration=...)``: on ZeroGPU it must wrap the function at import time;
    anywhere else it returns the function unchanged."""
    import spaces

    wrapped: Callable[..., Any] = spaces.GPU(duration=record.duration)(record.fn)
    return wrapped


def gpu_function(fn: Any) -> GpuFunction | None:
    """The record of a decorated function (``None`` for any other callable)."""
    record = getattr(fn, ATTRIBUTE, None)
    return record if isinstance(record, GpuFunction) else None
