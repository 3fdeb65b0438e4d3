"""The one function that touches the GPU, wrapped in ``@spaces.GPU``.

On ZeroGPU, ``spaces`` runs it in a forked worker: it must be synchronous,
its arguments and results must pickle, and ``spaces`` must be imported before
CUDA is touched (this module is imported by the GPU tier before any model
loads). Off ZeroGPU the decorator returns the function unchanged. ``duration``
is computed from the batch (steps and pixels), so short requests get
ZeroGPU's better queue priority and are charged only what they need.

The loaded model lives in a module global because a ZeroGPU worker reaches it
by inheritance, not through arguments.

The GPU function, :func:`run_batch_on_gpu`, returns a
:class:`~gpu_backend.workload.batching.BatchOutcome`: a failed batch has been retried
one request at a time, so each request has its own image or error and its own
charge, and one bad request never fails or charges another client's.
"""

from __future__ import annotations

import spaces  # (import before torch/CUDA: ZeroGPU requires it)

from splitspace.gpu_backend.workload.batching import BatchOutcome, run_batch_isolating_failures
from splitspace.gpu_backend.workload.model import CompileConfig, ModelExecutor
from splitspace.shared.contract.schema import GenerateRequest

_executor: ModelExecutor | None = None
MIN_DURATION_S = 5
DURATION_MARGIN = 3.0


def load_model(spec: str, *, max_batch: int | None = None, compile_unet: CompileConfig | None = None) -> ModelExecutor:
    """Load ``spec`` once and make it the model the GPU function uses (see
    :meth:`ModelExecutor.from_spec` for ``max_batch`` and ``compile_unet``)."""
    global _executor
    _executor = ModelExecutor.from_spec(spec, max_batch=max_batch, compile_unet=compile_unet)
    return _executor


def set_executor(executor: ModelExecutor) -> None:
    global _executor
    _executor = executor


def current_executor() -> ModelExecutor:
    if _executor is None:
        raise RuntimeError("no model loaded; call load_model() first")
    return _executor


def estimate_seconds(steps: int, width: int, height: int, guidance_scale: float, batch: int) -> float:
    """The loaded model's first guess of a batch's GPU seconds (``CostModel``'s base)."""
    return current_executor().estimate_seconds(steps, width, height, batch, guidance_scale=guidance_scale)


def resolve(request: GenerateRequest) -> tuple[int, float]:
    """The steps and guidance the loaded model runs ``request`` with (its preset for those unset)."""
    return current_executor().resolve(request)


def model_name() -> str:
    """The loaded model's name (what a job's info says it ran on)."""
    return current_executor().name


def batch_cap(setting: int) -> int:
    """The most requests one call may take: the tier's setting, capped by the model's own."""
    return max(1, min(setting, current_executor().max_batch))


def zerogpu_duration(estimate_s: float) -> float:
    """Seconds to ask for a GPU call estimated at ``estimate_s``: on ZeroGPU, with the safety
    margin (a call past its duration is killed); elsewhere the estimate itself (admission's)."""
    if not spaces.config.Config.zero_gpu:
        return estimate_s
    return max(MIN_DURATION_S, int(estimate_s * DURATION_MARGIN) + 1)


def gpu_duration(requests: list[GenerateRequest], seeds: list[int], costs: list[float] | None = None) -> int:
    """Seconds to ask ZeroGPU for: the cost model's estimate with a safety margin. The
    requests come resolved (steps and guidance decided at admission)."""
    executor = current_executor()
    first = requests[0]
    steps, guidance = executor.resolve(first)
    estimate = executor.estimate_seconds(steps, first.width, first.height, len(requests), guidance_scale=guidance)
    return max(MIN_DURATION_S, int(estimate * DURATION_MARGIN) + 1)


@spaces.GPU(duration=gpu_duration)
def run_batch_on_gpu(
    requests: list[GenerateRequest], seeds: list[int], costs: list[float] | None = None
) -> BatchOutcome:
    """Run one batch of compatible requests, isolating failures: one result (image or
    exception) and one charge per request (the time split by ``costs``, the requests'
    estimates). On ZeroGPU the retries of a failed batch run inside the same GPU call,
    within the ``duration`` asked for the batch."""
    return run_batch_isolating_failures(current_executor(), requests, seeds, costs=costs)
