"""What one job of the runner carries: a typed workload, so that every kind of GPU work
goes through one path for admission, fair order, charging and cancellation.

The runner (``admission/runner.py``) knows nothing of images or of a developer's
functions. A job holds a :class:`Work`: its payload, its cost estimate, its batch key,
and the :class:`Workload` that runs a batch of such payloads on the GPU thread and turns
one output into the hop's answer on the event loop: one per ``@splitspace.gpu`` function
of the app the tier serves (``app_functions.py``; the built-in text-to-image is such an
app). Jobs batch together only when their batch keys match, and a key belongs to one
workload, so a batch is always of one kind.

A job whose work ``streams`` (a developer's generator) runs alone through
:meth:`Workload.run_stream` instead: the workload hands each yield, postprocessed, to a
:class:`StreamSink` (the runner's, which passes it to the waiting handler and charges the
time used so far), and stops between yields when the sink says so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from splitspace.gpu_backend.workload.batching import BatchOutcome
from splitspace.shared.contract.calls import CallResult

P = TypeVar("P")
Answer = CallResult
"""The last update of a job: its function's outputs."""


@dataclass(frozen=True)
class Timing:
    """Where one job's time went, for its answer's info (the runner's clock)."""

    submitted: float
    started: float
    gpu_s: float
    client: str
    label: str
    """What the batch ran on, read as it started (its function's name)."""
    clock: Callable[[], float]

    @property
    def queue_s(self) -> float:
        return round(self.started - self.submitted, 4)

    def total_s(self) -> float:
        """From admission to now (the answer is ready)."""
        return round(self.clock() - self.submitted, 4)


class StreamSink(Protocol):
    """Where a streaming job's GPU thread puts each yield, and learns when to stop."""

    def emit(self, data: list[Any]) -> None:
        """One yield's outputs, as payloads for the hop (thread-safe; never blocks)."""

    def stopped(self) -> bool:
        """True once the caller has left: stop at the next yield."""

    def progress(self) -> None:
        """A yield was produced: charge the time used so far (now and then, not every time)."""


class StreamStopped(Exception):
    """A stream ended because its caller left (nobody is waiting for its answer)."""


class Workload(ABC, Generic[P]):
    """One kind of GPU work: how a batch of its payloads runs, and what one output becomes."""

    failure = "the function"
    """What an error names as having failed: "the function failed (RuntimeError)"."""

    def max_batch(self) -> int:
        """The most jobs of this kind one call runs."""
        return 1

    def label(self) -> str:
        """Read on the GPU thread as a batch starts (a function's: its name)."""
        return ""

    @abstractmethod
    def run_batch(self, payloads: list[P], costs: list[float]) -> BatchOutcome:
        """On a GPU thread: one result (an output or an exception) and one charge per payload."""

    def run_stream(self, payload: P, sink: StreamSink) -> Any:
        """On a GPU thread, for work that ``streams``: run it, each yield to ``sink``; return
        the output that :meth:`finish` takes; raise StreamStopped when ``sink`` stopped it."""
        raise NotImplementedError(f"{type(self).__name__} does not stream")

    @abstractmethod
    def finish(self, payload: P, output: Any, timing: Timing) -> Answer | Awaitable[Answer]:
        """On the event loop: the answer for one output, or an awaitable of it when making it
        takes work that must leave the loop (a component's postprocess)."""


@dataclass(frozen=True)
class Work(Generic[P]):
    """What one admitted job runs: its payload, of its workload's kind."""

    workload: Workload[P]
    payload: P
    cost: float
    """The admission estimate, GPU seconds; the job is settled with its measured share."""
    batch_key: Hashable | None = None
    """Jobs with equal keys may share one call (None: never batched)."""
    streams: bool = False
    """Runs alone through :meth:`Workload.run_stream`, each yield sent as it comes (never batched)."""
