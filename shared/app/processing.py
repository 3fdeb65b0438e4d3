"""What Gradio does around one event's function, for a call that crossed the hop.

A call (:class:`~shared.contract.calls.Call`) carries Gradio's API payloads, files as
bytes. Whoever runs the function (the GPU tier, or the frontend's in-process
``MockTransport`` in tests) does what Gradio's ``Blocks.process_api`` would have done
on one machine, written once here:

- :meth:`EventProcessing.preprocess`: each carried file written into the Gradio cache,
  then each payload validated by its input component's data model and ``preprocess``-ed
  (``Blocks.preprocess_data``); a payload that cannot be read raises ValidationFailed
  naming the input by its label, and a file named by a path (not carried) is refused;
- :meth:`EventProcessing.call` / :meth:`EventProcessing.call_batch`: the function, as
  Gradio calls it (a dict of inputs, keyword inputs; with ``batch=True`` one list per
  input and one list per output); a generator is consumed and its last yield is the
  output;
- :meth:`EventProcessing.call_streaming`: a generator event (``streams``, sync or async,
  not a batch) one yield at a time (``shared/app/streaming.py``), each yield read as
  outputs as a return value is and postprocessed at once, stoppable between yields, and
  stopped with TimeLimitExceeded past the event's ``time_limit``;
- :meth:`EventProcessing.postprocess`: each output ``postprocess``-ed by its output
  component and moved to the cache as Gradio does, then every file carried as its bytes
  (:meth:`EventProcessing.postprocess_now`: the same, blocking, for a GPU thread).

The event is read once (:meth:`EventProcessing.of`), so a tier that rewires the event
afterwards (the frontend forwards its calls) does not change what runs here.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
from gradio import processing_utils
from gradio import utils as gr_utils
from gradio.blocks import Block
from gradio.exceptions import Error as GradioError
from gradio_client import utils as client_utils

from splitspace.shared.app.files import BadFile, FileTooLarge, inline_files, outline_files
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.app.streaming import OverTime, Yields
from splitspace.shared.contract.errors import GpuFailed, TimeLimitExceeded, ValidationFailed


def input_label(block: Any, index: int) -> str:
    """How an error names an input: its label, else its place ("input 2")."""
    label = getattr(block, "label", None)
    return str(label) if isinstance(label, str) and label else f"input {index + 1}"


@dataclass(frozen=True)
class EventProcessing:
    """One GPU event's function, components and flags, as the app defined them."""

    api_name: str
    fn: Callable[..., Any]
    """The event's own callable: the decorator's wrapper (``spaces.GPU`` on ZeroGPU)."""
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    preprocess_inputs: bool
    postprocess_outputs: bool
    inputs_as_dict: bool
    keyword_names: tuple[str, ...]
    batch: bool
    streams: bool = False
    """A generator (sync or async) that is not a batch function: each yield is streamed."""
    time_limit: float | None = None
    """Seconds a stream may run (the decorator's ``time_limit``, else the event's)."""

    @classmethod
    def of(cls, endpoint: GpuEndpoint) -> EventProcessing:
        block_fn = endpoint.block_fn
        assert block_fn.fn is not None  # (the loader found the decorator's record on it)
        return cls(  # the call's shape as the loader read it (the endpoint keeps it), the rest as it is now
            api_name=endpoint.api_name,
            fn=block_fn.fn,
            inputs=tuple(block_fn.inputs),
            outputs=tuple(block_fn.outputs),
            preprocess_inputs=endpoint.preprocess,
            postprocess_outputs=bool(block_fn.postprocess),
            inputs_as_dict=endpoint.inputs_as_dict,
            keyword_names=endpoint.keyword_names,
            batch=endpoint.record.batch,
            streams=endpoint.streams,
            time_limit=endpoint.time_limit,
        )

    # -- inputs (blocking: run off the event loop) -------------------------------------------
    def preprocess(self, data: Sequence[Any], *, cache_dir: str, max_file_bytes: int) -> list[Any]:
        """The function's inputs (one value per input component) from a call's payloads."""
        if len(data) != len(self.inputs):
            raise ValidationFailed("data", f"expected {len(self.inputs)} values, got {len(data)}")
        return [
            self._preprocess_one(i, block, value, cache_dir, max_file_bytes)
            for i, (block, value) in enumerate(zip(self.inputs, data, strict=True))
        ]

    def _preprocess_one(self, index: int, block: Any, value: Any, cache_dir: str, max_file_bytes: int) -> Any:
        label = input_label(block, index)
        if _names_a_file(value):  # every file crosses as its bytes; a path would name a file on this machine
            raise ValidationFailed(label, "a file must be carried as its bytes, not as a path")
        try:
            value = outline_files(value, cache_dir, max_bytes=max_file_bytes)
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
        if not self.preprocess_inputs:
            return value.model_dump() if isinstance(value, pydantic.BaseModel) else value
        try:
            return block.preprocess(value)
        except GradioError as exc:
            raise ValidationFailed(label, str(exc.message)) from None
        except Exception as exc:  # the component could not read it: say which input, no internals
            raise ValidationFailed(label, f"could not be read ({type(exc).__name__})") from None

    # -- the function (blocking) ---------------------------------------------------------------
    def call(self, args: list[Any]) -> list[Any]:
        """One call's outputs, one value per output component (a batch function: a batch of one)."""
        if self.batch:
            return self.call_batch([args])[0]
        return self.outputs_of(self.invoke(args))

    def call_batch(self, rows: list[list[Any]]) -> list[list[Any]]:
        """A batch function's call, Gradio's batch semantics: each input as the list of its
        values, each output as the list of its values; one list of outputs per row."""
        if not self.batch:
            raise RuntimeError("a function without batch=True takes one call at a time")
        columns = [list(values) for values in zip(*rows, strict=True)]
        predictions = self.invoke(columns)
        n = len(self.outputs)
        if not isinstance(predictions, list | tuple) or len(predictions) != n:
            raise TypeError(f"a batch function must return one list per output ({n})")
        per_output = [list(values) for values in predictions]
        if any(len(values) != len(rows) for values in per_output):
            raise ValueError(f"a batch function must return {len(rows)} values per output")
        return [[values[i] for values in per_output] for i in range(len(rows))]

    def invoke(self, values: list[Any]) -> Any:
        """The function called as Gradio calls it; a generator consumed to its last yield."""
        return _last(self._called(values))

    def call_streaming(
        self,
        values: list[Any],
        emit: Callable[[list[Any]], None],
        *,
        should_stop: Callable[[], bool] = lambda: False,
        max_file_bytes: int,
    ) -> list[Any]:
        """A generator's call, blocking (a GPU thread): each yield read as outputs,
        postprocessed (files carried as bytes) and given to ``emit`` as it comes; returns the
        last one's payloads (the result). Between yields, ``should_stop()`` stops it with
        ``streaming.Stopped``, and its time limit with TimeLimitExceeded (naming the limit);
        the generator is closed however it ends."""
        limit = self.time_limit
        deadline = None if limit is None else time.monotonic() + limit
        items = Yields(self._called(values), should_stop=should_stop, deadline=deadline)
        data: list[Any] | None = None
        try:
            for prediction in items:
                data = self.postprocess_now(self.outputs_of(prediction), max_file_bytes=max_file_bytes)
                emit(data)
        except OverTime:
            raise TimeLimitExceeded.after(limit or 0.0) from None
        finally:
            items.close()
        if data is None:  # it yielded nothing: its output is None, as a generator's last yield is
            data = self.postprocess_now(self.outputs_of(None), max_file_bytes=max_file_bytes)
        return data

    def _called(self, values: list[Any]) -> Any:
        args: list[Any] = list(values)
        kwargs: dict[str, Any] = {}
        if self.inputs_as_dict:
            args = [dict(zip(self.inputs, values, strict=True))]
        elif self.keyword_names:
            k = len(self.keyword_names)
            args, kwargs = args[:-k], dict(zip(self.keyword_names, args[-k:], strict=True))
        return self.fn(*args, **kwargs)

    def outputs_of(self, prediction: Any) -> list[Any]:
        """One value per output component, as Gradio's ``postprocess_data`` reads a return value."""
        outputs = self.outputs
        if isinstance(prediction, dict) and prediction and all(isinstance(k, Block) for k in prediction):
            return [prediction.get(block, {"__type__": "update"}) for block in outputs]
        if len(outputs) == 1:
            return [prediction]
        if not isinstance(prediction, list | tuple) or len(prediction) < len(outputs):
            got = len(prediction) if isinstance(prediction, list | tuple) else 1
            raise ValueError(f"the function returned {got} values for {len(outputs)} outputs")
        return list(prediction[: len(outputs)])

    # -- outputs (on the event loop; the work in threads) --------------------------------------
    async def postprocess(self, values: list[Any], *, max_file_bytes: int) -> list[Any]:
        """The outputs as payloads for the hop: postprocessed, their files carried as bytes.
        An output file over ``max_file_bytes`` raises GpuFailed, which says so."""
        data = [await self._postprocess_one(block, value) for block, value in zip(self.outputs, values, strict=True)]
        try:
            return await asyncio.to_thread(inline_files, data, max_bytes=max_file_bytes)
        except FileTooLarge as exc:
            raise GpuFailed(f"an output is too large to send: {exc}") from None

    def postprocess_now(self, values: list[Any], *, max_file_bytes: int) -> list[Any]:
        """:meth:`postprocess`, blocking (a GPU thread postprocesses each yield of a stream)."""
        data = [self._postprocess_one_now(block, value) for block, value in zip(self.outputs, values, strict=True)]
        try:
            return inline_files(data, max_bytes=max_file_bytes)
        except FileTooLarge as exc:
            raise GpuFailed(f"an output is too large to send: {exc}") from None

    def _postprocess_one_now(self, block: Any, value: Any) -> Any:
        if getattr(block, "stateful", False):
            return value
        if isinstance(value, Block):
            value = {**value.constructor_args, "__type__": "update"}
        if gr_utils.is_prop_update(value):
            update = dict(value)
            if "value" in update:
                update["value"] = self._postprocess_one_now(block, update["value"])
            return update
        if self.postprocess_outputs:
            value = block.postprocess(value)
            if isinstance(value, pydantic.BaseModel):
                value = value.model_dump()
        return processing_utils.move_files_to_cache(value, block, postprocess=True)

    async def _postprocess_one(self, block: Any, value: Any) -> Any:
        if getattr(block, "stateful", False):
            return value
        if isinstance(value, Block):  # a component returned as an update of its props
            value = {**value.constructor_args, "__type__": "update"}
        if gr_utils.is_prop_update(value):
            update = dict(value)
            if "value" in update:
                update["value"] = await self._postprocess_one(block, update["value"])
            return update
        if self.postprocess_outputs:
            value = await asyncio.to_thread(block.postprocess, value)
            if isinstance(value, pydantic.BaseModel):
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
    coroutine's value (run here, on a worker thread, which has no event loop of its own)."""
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
