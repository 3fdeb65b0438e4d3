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

Two more, for a batch function that cannot take any calls together, and for outputs that
tell the caller what the call cost (the built-in text-to-image uses both):

- ``batch_key``: a function of one call's inputs; only calls with equal keys share a batch
  (e.g. images of one size), so the function gets batches its model can run in one pass;
- ``report``: a function of one call's outputs (a list, one value per output component)
  and its :class:`~shared.contract.calls.CallInfo` (whose call, its queue, GPU and total
  seconds), returning the outputs the caller gets; it runs after the function, where the
  call was measured (the GPU tier; in one process, with the time measured there).

``max_batch_size`` may be a function of nothing, read at each batch (a model's own cap,
which changes when the model does).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from splitspace.shared.contract.calls import CallInfo

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DURATION_S = 60.0
"""ZeroGPU's default ``duration`` (seconds), used when the decorator is given none."""
ATTRIBUTE = "__splitspace_gpu__"
"""Where a decorated function keeps its :class:`GpuFunction` record."""

Duration = float | Callable[..., float]
BatchSize = int | Callable[[], int]
Report = Callable[[list[Any], CallInfo], Sequence[Any]]
_tier_reports = False
"""True in a process whose tier calls ``report`` itself, with the call's measured info (the GPU tier)."""
LOCAL_CLIENT = "local"
"""Whose call a ``report`` is told in one process (``python app.py``): no tier knows the caller."""


@dataclass(frozen=True)
class GpuFunction:
    """What the tiers know of one decorated function."""

    fn: Callable[..., Any]
    """The developer's function, undecorated."""
    duration: Duration = DEFAULT_DURATION_S
    batch: bool = False
    max_batch_size: BatchSize = 4
    """With ``batch``: how many calls one invocation takes at most (Gradio's ``max_batch_size``),
    or a function that says it at each batch."""
    time_limit: float | None = None
    """Seconds a generator may run on the GPU before it is stopped (None: the event's ``time_limit``, if any)."""
    batch_key: Callable[..., Hashable] | None = None
    """With ``batch``: a function of one call's inputs; only calls with equal keys share a batch."""
    report: Report | None = None
    """A function of one call's outputs and its :class:`CallInfo`: the outputs the caller gets."""

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "fn")

    @property
    def is_generator(self) -> bool:
        return inspect.isgeneratorfunction(self.fn) or inspect.isasyncgenfunction(self.fn)

    def batch_cap(self) -> int:
        """The most calls one invocation takes now (1 without ``batch``; a cap function that
        fails or answers nonsense counts as 1: the calls then run one at a time)."""
        if not self.batch:
            return 1
        if not callable(self.max_batch_size):
            return self.max_batch_size
        try:
            cap = self.max_batch_size()
        except Exception:
            return 1
        return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1 else 1

    def key_of(self, *args: Any) -> Hashable:
        """The batch key of one call with these (preprocessed) inputs (None without ``batch_key``)."""
        return None if self.batch_key is None else self.batch_key(*args)

    def reported(self, outputs: list[Any], info: CallInfo) -> list[Any]:
        """One call's outputs as the caller gets them: ``report``'s, else unchanged."""
        if self.report is None:
            return outputs
        answer = list(self.report(list(outputs), info))
        if len(answer) != len(outputs):
            raise ValueError(f"report returned {len(answer)} outputs for {len(outputs)}")
        return answer

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
    max_batch_size: BatchSize = 4,
    time_limit: float | None = None,
    batch_key: Callable[..., Hashable] | None = None,
    report: Report | None = None,
) -> Callable[[F], F]: ...
def gpu(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    duration: Duration = DEFAULT_DURATION_S,
    batch: bool = False,
    max_batch_size: BatchSize = 4,
    time_limit: float | None = None,
    batch_key: Callable[..., Hashable] | None = None,
    report: Report | None = None,
) -> Any:
    """Mark ``fn`` to run on the GPU tier: ``@splitspace.gpu`` or ``@splitspace.gpu(duration=...)``."""
    if isinstance(duration, bool) or not (callable(duration) or (isinstance(duration, int | float) and duration > 0)):
        raise ValueError("duration must be a positive number of seconds or a function of the inputs")
    if batch and not callable(max_batch_size) and (not isinstance(max_batch_size, int) or max_batch_size < 1):
        raise ValueError("max_batch_size must be a positive integer, or a function that returns one")
    if batch_key is not None and not (batch and callable(batch_key)):
        raise ValueError("batch_key must be a function of a call's inputs, and needs batch=True")
    if report is not None and not callable(report):
        raise ValueError("report must be a function of a call's outputs and its CallInfo")
    if time_limit is not None and (
        isinstance(time_limit, bool) or not isinstance(time_limit, int | float) or not 0 < time_limit < float("inf")
    ):
        raise ValueError("time_limit must be a positive number of seconds")

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        inner = gpu_function(f)  # decorated twice: the developer's function is the inner one
        record = GpuFunction(
            inner.fn if inner else f,
            duration,
            batch,
            max_batch_size,
            None if time_limit is None else float(time_limit),
            batch_key,
            report,
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
        start = time.perf_counter()
        out = target(*args, **kwargs)
        return _reported_here(record, out, time.perf_counter() - start)

    return call


def tier_reports() -> None:
    """This process's tier calls each function's ``report`` itself (``AppFunction``): the
    decorated function no longer does."""
    global _tier_reports
    _tier_reports = True


def _reported_here(record: GpuFunction, out: Any, gpu_s: float) -> Any:
    """The function's return value with ``report`` applied to each call in it, in one process:
    with ``batch``, Gradio's batch form (one list per output, one item per call); else one
    output as itself, several as a tuple (a list is one output's value: a gallery's)."""
    if record.report is None or _tier_reports:
        return out
    several = isinstance(out, tuple)
    if record.batch:
        rows = [list(row) for row in zip(*out, strict=True)]
    else:
        rows = [list(out) if several else [out]]
    share = round(gpu_s / max(1, len(rows)), 4)
    info = CallInfo(endpoint=record.name, queue_s=0.0, gpu_s=share, total_s=share, client=LOCAL_CLIENT)
    rows = [record.reported(row, info) for row in rows]
    if record.batch:
        columns = [list(column) for column in zip(*rows, strict=True)] if rows else [list(c) for c in out]
        return tuple(columns) if isinstance(out, tuple) else columns
    return tuple(rows[0]) if several else rows[0][0]


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
