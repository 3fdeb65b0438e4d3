"""The built-in text-to-image as a workload of the runner (``work.py``).

Admission decides each request's seed, steps and guidance once (the model's preset for
those left unset): its cost estimate, ZeroGPU's duration, the model call and the reported
info all use them. A batch runs through the GPU function (``gpu.run_batch_on_gpu``, which
isolates failures), a batch that ran whole calibrates the cost model, and each image is
PNG-encoded into a :class:`~shared.contract.hop.Result`, off the event loop when large.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from splitspace.gpu_backend.workload.batching import BatchOutcome
from splitspace.gpu_backend.workload.cost import CostModel
from splitspace.gpu_backend.workload.work import Timing, Work, Workload
from splitspace.shared.contract.hop import GenerateInfo, Result
from splitspace.shared.contract.schema import MAX_SEED, GenerateRequest

INLINE_ENCODE_PIXELS = 128 * 128
"""Images up to this size are PNG-encoded on the event loop; larger ones in a worker thread."""

BatchFn = Callable[[list[GenerateRequest], list[int], list[float]], BatchOutcome]
"""Runs one batch (requests, seeds, cost estimates): ``gpu.run_batch_on_gpu``."""


def encode_png(image: Any) -> bytes:
    """Lossless (same seed, same pixels); compress_level=1 is several times faster than
    the default and the hop is loopback or a datacenter link, where bytes are cheap."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class TextToImage(Workload[GenerateRequest]):
    def __init__(
        self,
        cost: CostModel,
        *,
        run_batch: BatchFn,
        resolve: Callable[[GenerateRequest], tuple[int, float]],
        model_name: Callable[[], str],
        max_batch: int = 1,
    ) -> None:
        self.cost = cost
        self.batch_cap = max_batch
        """The most requests one pipeline call takes (changes with the model: ``GpuTier.change_model``)."""
        self._run_batch_fn = run_batch
        self._resolve = resolve
        self._model_name = model_name

    def resolve(self, request: GenerateRequest) -> GenerateRequest:
        """The request with every choice made: a random seed for -1, the model's preset
        for steps and guidance left unset."""
        steps, guidance = self._resolve(request)
        seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
        return dataclasses.replace(request, steps=steps, guidance_scale=guidance, seed=seed)

    def prepare(self, request: GenerateRequest) -> Work[GenerateRequest]:
        """The job for ``request``: resolved, with its estimate and its batch key (the
        requests that one pipeline call can take together)."""
        request = self.resolve(request)
        assert request.steps is not None and request.guidance_scale is not None  # resolve() chose them
        estimate = self.cost.estimate(request.steps, request.width, request.height, request.guidance_scale)
        key = (request.width, request.height, request.steps, request.guidance_scale)
        return Work(self, request, estimate, key)

    def max_batch(self) -> int:
        return self.batch_cap

    def label(self) -> str:
        return self._model_name()  # a model change waits for the GPU to go idle (swap)

    def run_batch(self, payloads: list[GenerateRequest], costs: list[float]) -> BatchOutcome:
        return self._run_batch_fn(payloads, [r.seed for r in payloads], costs)

    def observe(self, payloads: list[GenerateRequest], outcome: BatchOutcome) -> None:
        if outcome.isolated:  # no measurement of a batch: do not calibrate with it
            return
        first = payloads[0]
        assert first.steps is not None and first.guidance_scale is not None  # resolved at admission
        self.cost.observe(first.steps, first.width, first.height, first.guidance_scale, len(payloads), outcome.total_s)

    def finish(self, payload: GenerateRequest, output: Any, timing: Timing) -> Result | Awaitable[Result]:
        if payload.pixels <= INLINE_ENCODE_PIXELS:  # small: a thread hop costs more than encoding
            return self._result(payload, encode_png(output), timing)

        async def encoded() -> Result:
            png = await asyncio.to_thread(encode_png, output)
            return self._result(payload, png, timing)

        return encoded()

    @staticmethod
    def _result(req: GenerateRequest, png: bytes, timing: Timing) -> Result:
        assert req.steps is not None and req.guidance_scale is not None  # resolved at admission
        info = GenerateInfo(
            seed=req.seed,
            width=req.width,
            height=req.height,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            model=timing.label,
            queue_s=timing.queue_s,
            gpu_s=round(timing.gpu_s, 4),
            total_s=timing.total_s(),
            client=timing.client,
        )
        return Result(png, info)
