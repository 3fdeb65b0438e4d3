"""A generator's yields pulled one at a time on a worker thread, and stopped between them.

The GPU tier runs a developer's generator function on its GPU thread, which has no event
loop, and must stop it the moment its caller leaves or it runs past its time limit, so
that the GPU goes to the next job. :class:`Yields` is that loop, written once:

- a sync generator is advanced with ``next`` on the calling thread; it cannot be
  interrupted while it computes its next item, so it stops at its next yield;
- an async generator (a ``gr.ChatInterface`` event's function is one, whatever the
  developer wrote) runs on a private event loop of the calling thread; its next item is
  awaited in slices of :data:`POLL_S`, so a stop or the deadline is noticed while it
  awaits, and the pending step is cancelled;
- anything else (a function's plain return value) is one item.

:meth:`Yields.close` closes the generator (its ``finally`` blocks run) whichever way it
ended. The stop and the deadline are checked before each item is pulled: an item already
produced is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

POLL_S = 0.05
"""How often a stop or the deadline is looked at while an async generator awaits its next item."""


class Stopped(Exception):
    """The stop was asked for (the caller left)."""


class OverTime(Exception):
    """The deadline passed before the generator was done."""


_END = object()


class Yields(Iterator[Any]):
    """The items of ``result`` (a generator, an async generator, or one plain value)."""

    def __init__(
        self,
        result: Any,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``deadline``: on ``clock``'s scale (monotonic seconds), None for none."""
        self._should_stop = should_stop
        self._deadline = deadline
        self._clock = clock
        self._sync = result if inspect.isgenerator(result) else None
        self._async = result if inspect.isasyncgen(result) else None
        self._loop = asyncio.new_event_loop() if self._async is not None else None
        self._single: list[Any] = [] if self._sync is not None or self._async is not None else [result]
        self._done = False

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        self._check()
        if self._sync is not None:
            try:
                return next(self._sync)
            except StopIteration:
                self._done = True
                raise
        if self._async is not None:
            assert self._loop is not None
            item = self._loop.run_until_complete(self._pull())
            if item is _END:
                self._done = True
                raise StopIteration
            return item
        if self._single:
            return self._single.pop()
        self._done = True
        raise StopIteration

    def _check(self) -> None:
        if self._should_stop():
            raise Stopped
        if self._deadline is not None and self._clock() >= self._deadline:
            raise OverTime

    async def _pull(self) -> Any:
        agen = self._async
        assert agen is not None

        async def step() -> Any:
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return _END

        task = asyncio.ensure_future(step())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                self._check()
        except (Stopped, OverTime):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise

    def close(self) -> None:
        """Close the generator (idempotent); its ``finally`` blocks run here."""
        self._done = True
        if self._sync is not None:
            self._sync.close()
        if self._async is not None and self._loop is not None and not self._loop.is_closed():
            loop = self._loop
            try:
                loop.run_until_complete(self._async.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
