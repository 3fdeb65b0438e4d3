"""A developer's ``@splitspace.gpu`` function as a workload of the runner (``work.py``).

One :class:`AppFunction` per GPU event of the app (``shared/app/loader.py``); what Gradio
does around the function is :class:`~shared.app.processing.EventProcessing`'s, split
where the runner needs it:

- :meth:`AppFunction.prepare` (blocking, off the event loop, before admission): the
  call's payloads preprocessed, and its admission estimate: the decorator's ``duration``
  of these inputs, as ZeroGPU computes it (for ``batch=True``, of lists of one);
- :meth:`AppFunction.run_batch` (a GPU thread): the function alone, or for ``batch=True``
  the calls the scheduler put together (same function, other clients, fair order) in one
  Gradio batch call; a failed batch is run again one call at a time
  (``batching.run_isolating_failures``), so each caller gets its own outputs or error and
  pays its own share;
- :meth:`AppFunction.run_stream` (a GPU thread, a generator function): each yield read as
  outputs, postprocessed there (files carried as bytes) and handed to the runner's sink,
  which sends it as a :class:`~shared.contract.calls.Partial`; stopped between yields when
  the caller leaves or the time limit passes (``TimeLimitExceeded``, naming it);
- :meth:`AppFunction.finish` (the event loop): the outputs given to the decorator's
  ``report`` with the call's measured info (if it has one), postprocessed and carried into
  a :class:`~shared.contract.calls.CallResult` (a stream's last yield, already postprocessed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from splitspace.gpu_backend.workload.batching import BatchOutcome, run_isolating_failures
from splitspace.gpu_backend.workload.work import StreamSink, StreamStopped, Timing, Work, Workload
from splitspace.shared.app.gpu_function import tier_reports
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.app.processing import EventProcessing
from splitspace.shared.app.streaming import Stopped
from splitspace.shared.contract.calls import Call, CallInfo, CallResult

BATCH_KEY = "splitspace.call"
"""The first part of a batch function's batch key (then its API name, then its ``batch_key``'s, if any)."""


@dataclass(frozen=True)
class Prepared:
    """One call's inputs, preprocessed: what the function takes, one value per input component."""

    args: list[Any]


@dataclass(frozen=True)
class Streamed:
    """A stream's output: its last yield, already postprocessed (payloads for the hop)."""

    data: list[Any]


class AppFunction(Workload[Prepared]):
    def __init__(self, endpoint: GpuEndpoint, *, cache_dir: str, max_file_bytes: int) -> None:
        self.endpoint = endpoint
        self.event = EventProcessing.of(endpoint)
        tier_reports()  # the function's report runs in finish(), with what the runner measured
        self.cache_dir = cache_dir
        self.max_file_bytes = max_file_bytes

    @property
    def api_name(self) -> str:
        return self.endpoint.api_name

    def prepare(self, call: Call) -> Work[Prepared]:
        """The job for ``call``: its inputs preprocessed, its estimate, its batch key.
        Blocking (files written, components' preprocess): run it off the event loop."""
        args = self.event.preprocess(call.data, cache_dir=self.cache_dir, max_file_bytes=self.max_file_bytes)
        record = self.endpoint.record
        estimate = record.estimate_s(*([a] for a in args)) if record.batch else record.estimate_s(*args)
        key: Hashable = None
        if record.batch:
            key = (
                (BATCH_KEY, self.api_name)
                if record.batch_key is None
                else (BATCH_KEY, self.api_name, record.key_of(*args))
            )
        return Work(self, Prepared(args), estimate, key, streams=self.event.streams)

    def max_batch(self) -> int:
        return self.endpoint.record.batch_cap()

    def label(self) -> str:
        return self.api_name

    def run_batch(self, payloads: list[Prepared], costs: list[float]) -> BatchOutcome:
        return run_isolating_failures(
            lambda items: self.event.call_batch([p.args for p in items]),
            lambda p: self.event.call(p.args),
            payloads,
            costs=costs,
        )

    def run_stream(self, payload: Prepared, sink: StreamSink) -> Streamed:
        def emit(data: list[Any]) -> None:
            sink.emit(data)
            sink.progress()

        try:
            return Streamed(
                self.event.call_streaming(
                    payload.args, emit, should_stop=sink.stopped, max_file_bytes=self.max_file_bytes
                )
            )
        except Stopped:
            raise StreamStopped from None

    def finish(self, payload: Prepared, output: Any, timing: Timing) -> CallResult | Awaitable[CallResult]:
        if isinstance(output, Streamed):
            return CallResult(output.data, self._info(timing))
        return self._answer(output, timing)

    async def _answer(self, values: list[Any], timing: Timing) -> CallResult:
        info = self._info(timing)
        data = await self.event.postprocess(
            self.endpoint.record.reported(values, info), max_file_bytes=self.max_file_bytes
        )
        return CallResult(data, info)

    def _info(self, timing: Timing) -> CallInfo:
        return CallInfo(
            endpoint=self.api_name,
            queue_s=timing.queue_s,
            gpu_s=round(timing.gpu_s, 4),
            total_s=timing.total_s(),
            client=timing.client,
        )


def app_functions(endpoints: Iterable[GpuEndpoint], *, cache_dir: str, max_file_bytes: int) -> dict[str, AppFunction]:
    """The workload of each GPU event, by API name."""
    return {e.api_name: AppFunction(e, cache_dir=cache_dir, max_file_bytes=max_file_bytes) for e in endpoints}
