"""A developer's ``@splitspace.gpu`` function as a workload of the runner (``work.py``).

One :class:`AppFunction` per GPU event of the app (``shared/app/loader.py``). For a call
(:class:`~shared.contract.calls.Call`: Gradio's API payloads, files carried as bytes) it
does what Gradio does around an event's function, split where the runner needs it:

- :meth:`AppFunction.prepare` (blocking, off the event loop, before admission): each
  carried file is written into this tier's Gradio cache, then each payload is validated
  by its input component's data model and ``preprocess``-ed, as Gradio's
  ``Blocks.preprocess_data`` does; the admission estimate is the decorator's ``duration``
  of these inputs (as ZeroGPU computes it). A payload that cannot be read raises
  ValidationFailed naming the input by its label.
- :meth:`AppFunction.run_batch` (a GPU thread): the function, through the event's own
  callable (the decorator's wrapper: ``spaces.GPU`` on ZeroGPU), alone or, for
  ``batch=True``, with Gradio's batch semantics (one list per input, one list per output),
  a failed batch run again one call at a time (``batching.run_isolating_failures``). A
  generator is consumed and its last yield is the output (streaming is not carried yet).
- :meth:`AppFunction.finish` (the event loop, work in threads): each output
  ``postprocess``-ed by its output component and moved to the cache as Gradio does,
  then every file inlined as its bytes, into a :class:`~shared.contract.calls.CallResult`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import pydantic
from gradio import processing_utils
from gradio import utils as gr_utils
from gradio.blocks import Block
from gradio.data_classes import GradioModel, GradioRootModel
from gradio.exceptions import Error as GradioError
from gradio_client import utils as client_utils

from splitspace.gpu_backend.workload.batching import BatchOutcome, run_isolating_failures
from splitspace.gpu_backend.workload.work import Timing, Work, Workload
from splitspace.shared.app.files import BadFile, FileTooLarge, inline_files, outline_files
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.contract.calls import Call, CallInfo, CallResult
from splitspace.shared.contract.errors import ValidationFailed

BATCH_KEY = "splitspace.call"
"""The first part of a batch function's batch key (the second is its API name)."""


@dataclass(frozen=True)
class Prepared:
    """One call's inputs, preprocessed: what the function takes, one value per input component."""

    args: list[Any]


def input_label(block: Any, index: int) -> str:
    """How an error names an input: its label, else its place ("input 2")."""
    label = getattr(block, "label", None)
    return str(label) if isinstance(label, str) and label else f"input {index + 1}"


class AppFunction(Workload[Prepared]):
    failure = "the function"

    def __init__(self, endpoint: GpuEndpoint, *, cache_dir: str, max_file_bytes: int) -> None:
        self.endpoint = endpoint
        self.cache_dir = cache_dir
        self.max_file_bytes = max_file_bytes

    @property
    def api_name(self) -> str:
        return self.endpoint.api_name

    @property
    def batched(self) -> bool:
        return self.endpoint.record.batch

    # -- before admission (a worker thread) ------------------------------------------------
    def prepare(self, call: Call) -> Work[Prepared]:
        """The job for ``call``: its inputs preprocessed, its estimate, its batch key.
        Blocking (files written, components' preprocess): run it off the event loop."""
        inputs = self.endpoint.inputs
        if len(call.data) != len(inputs):
            raise ValidationFailed("data", f"expected {len(inputs)} values, got {len(call.data)}")
        args = [self._preprocess(i, block, value)
                for i, (block, value) in enumerate(zip(inputs, call.data, strict=True))]
        record = self.endpoint.record
        estimate = record.estimate_s(*([a] for a in args)) if self.batched else record.estimate_s(*args)
        key = (BATCH_KEY, self.api_name) if self.batched else None
        return Work(self, Prepared(args), estimate, key)

    def _preprocess(self, index: int, block: Any, value: Any) -> Any:
        label = input_label(block, index)
        if _names_a_file(value):
            # every file crosses as its bytes; a path would name a file on this machine
            raise ValidationFailed(label, "a file must be carried as its bytes, not as a path")
        try:
            value = outline_files(value, self.cache_dir, max_bytes=self.max_file_bytes)
        except (FileTooLarge, BadFile) as exc:
            raise ValidationFailed(label, str(exc)) from None
        if getattr(block, "stateful", False):
            return value
        data_model = getattr(block, "data_model", None)
        if data_model is not None and value is not None:
            try:
                value = data_model.model_validate(value, context={"validate_meta": True})
            except pydantic.ValidationError as exc:
                errors = exc.errors()
                raise ValidationFailed(label, str(errors[0]["msg"]) if errors else "is not valid") from None
        if not self.endpoint.block_fn.preprocess:
            return value.model_dump() if isinstance(value, GradioModel | GradioRootModel) else value
        try:
            return block.preprocess(value)
        except GradioError as exc:
            raise ValidationFailed(label, str(exc.message)) from None
        except Exception as exc:  # the component could not read it: say which input, no internals
            raise ValidationFailed(label, f"could not be read ({type(exc).__name__})") from None

    # -- on a GPU thread ---------------------------------------------------------------------
    def max_batch(self) -> int:
        return self.endpoint.record.max_batch_size if self.batched else 1

    def label(self) -> str:
        return self.api_name

    def run_batch(self, payloads: list[Prepared], costs: list[float]) -> BatchOutcome:
        if self.batched:
            return run_isolating_failures(self._run_many, lambda p: self._run_many([p])[0], payloads, costs=costs)
        return run_isolating_failures(self._run_many, lambda p: self._outputs(self._invoke(p.args)), payloads,
                                      costs=costs)

    def _run_many(self, payloads: list[Prepared]) -> list[list[Any]]:
        """A batch function's call (Gradio's batch semantics): each input as the list of its
        values, each output as the list of its values; one list of outputs per payload."""
        if not self.batched:
            raise RuntimeError("a function without batch=True takes one call at a time")
        columns = [list(values) for values in zip(*(p.args for p in payloads), strict=True)]
        predictions = self._invoke(columns)
        n = len(self.endpoint.outputs)
        if not isinstance(predictions, list | tuple) or len(predictions) != n:
            raise TypeError(f"a batch function must return one list per output ({n})")
        per_output = [list(values) for values in predictions]
        if any(len(values) != len(payloads) for values in per_output):
            raise ValueError(f"a batch function must return {len(payloads)} values per output")
        return [[values[i] for values in per_output] for i in range(len(payloads))]

    def _invoke(self, values: list[Any]) -> Any:
        """The event's function called as Gradio calls it (a dict of inputs, keyword inputs),
        through the event's own callable; a generator consumed to its last yield."""
        block_fn = self.endpoint.block_fn
        assert block_fn.fn is not None  # (the loader found the record on it)
        args: list[Any] = list(values)
        kwargs: dict[str, Any] = {}
        if block_fn.inputs_as_dict:
            args = [dict(zip(block_fn.inputs, values, strict=True))]
        elif block_fn.input_keyword_names:
            k = len(block_fn.input_keyword_names)
            args, kwargs = args[:-k], dict(zip(block_fn.input_keyword_names, args[-k:], strict=True))
        return _last(block_fn.fn(*args, **kwargs))

    def _outputs(self, prediction: Any) -> list[Any]:
        """One value per output component, as Gradio's ``postprocess_data`` reads a return value."""
        outputs = self.endpoint.outputs
        if isinstance(prediction, dict) and prediction and all(isinstance(k, Block) for k in prediction):
            return [prediction.get(block, {"__type__": "update"}) for block in outputs]
        if len(outputs) == 1:
            return [prediction]
        if not isinstance(prediction, list | tuple) or len(prediction) < len(outputs):
            got = len(prediction) if isinstance(prediction, list | tuple) else 1
            raise ValueError(f"the function returned {got} values for {len(outputs)} outputs")
        return list(prediction[: len(outputs)])

    # -- on the event loop ---------------------------------------------------------------------
    def finish(self, payload: Prepared, output: Any, timing: Timing) -> Awaitable[CallResult]:
        return self._answer(output, timing)

    async def _answer(self, values: list[Any], timing: Timing) -> CallResult:
        data = [await self._postprocess(block, value) for block, value in zip(self.endpoint.outputs, values,
                                                                               strict=True)]
        carried = await asyncio.to_thread(inline_files, data, max_bytes=self.max_file_bytes)
        info = CallInfo(endpoint=self.api_name, queue_s=timing.queue_s, gpu_s=round(timing.gpu_s, 4),
                        total_s=timing.total_s(), client=timing.client)
        return CallResult(carried, info)

    async def _postprocess(self, block: Any, value: Any) -> Any:
        if getattr(block, "stateful", False):
            return value
        if isinstance(value, Block):  # a component returned as an update of its props
            value = {**value.constructor_args, "__type__": "update"}
        if gr_utils.is_prop_update(value):
            update = dict(value)
            if "value" in update:
                update["value"] = await self._postprocess(block, update["value"])
            return update
        if self.endpoint.block_fn.postprocess:
            value = await asyncio.to_thread(block.postprocess, value)
            if isinstance(value, GradioModel | GradioRootModel):
                value = value.model_dump()
        # as Gradio does: a file the function named must be one it may serve, copied into the cache
        return await processing_utils.async_move_files_to_cache(value, block, postprocess=True)


def _names_a_file(value: Any) -> bool:
    """Whether a payload holds a file reference (Gradio's FileData: a path) anywhere."""
    if client_utils.is_file_obj_with_meta(value):
        return True
    if isinstance(value, dict):
        return any(_names_a_file(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_a_file(v) for v in value)
    return False


def _last(result: Any) -> Any:
    """The function's output: a generator's last yield (None if it yields nothing), a
    coroutine's value (run here, on the GPU thread, which has no event loop of its own)."""
    if inspect.isgenerator(result):
        last = None
        for item in result:
            last = item
        return last
    if inspect.isasyncgen(result):
        return asyncio.run(_last_async(result))
    if inspect.iscoroutine(result):
        return asyncio.run(_awaited(result))
    return result


async def _last_async(items: Any) -> Any:
    last = None
    async for item in items:
        last = item
    return last


async def _awaited(coroutine: Any) -> Any:
    return await coroutine


def app_functions(endpoints: Iterable[GpuEndpoint], *, cache_dir: str, max_file_bytes: int) -> dict[str, AppFunction]:
    """The workload of each GPU event, by API name."""
    return {e.api_name: AppFunction(e, cache_dir=cache_dir, max_file_bytes=max_file_bytes) for e in endpoints}
