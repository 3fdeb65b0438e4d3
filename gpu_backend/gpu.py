"""The one function that touches the GPU, wrapped in ``@spaces.GPU``.

On ZeroGPU, ``spaces`` runs it in a forked worker: it must be synchronous,
its arguments and results must pickle, and ``spaces`` must be imported before
CUDA is touched (this module is imported by the GPU tier before any model
loads). Off ZeroGPU the decorator returns the function unchanged. ``duration``
is computed from the batch (steps and pixels), so short requests get
ZeroGPU's better queue priority and are charged only what they need.

The loaded model lives in a module global because a ZeroGPU worker reaches it
by inheritance, not through arguments.
"""

from __future__ import annotations

import spaces  # noqa: F401  (import before torch/CUDA: ZeroGPU requires it)

from shared.schema import GenerateRequest

from .model import ModelExecutor

_executor: ModelExecutor | None = None
MIN_DURATION_S = 5
DURATION_MARGIN = 3.0


def load_model(spec: str) -> ModelExecutor:
    """Load ``spec`` once and make it the model the GPU function uses."""
    global _executor
    _executor = ModelExecutor.from_spec(spec)
    return _executor


def set_executor(executor: ModelExecutor) -> None:
    global _executor
    _executor = executor


def current_executor() -> ModelExecutor:
    if _executor is None:
        raise RuntimeError("no model loaded; call load_model() first")
    return _executor


def gpu_duration(requests: list[GenerateRequest], seeds: list[int]) -> int:
    """Seconds to ask ZeroGPU for: the cost model's estimate with a safety margin."""
    executor = current_executor()
    first = requests[0]
    steps, guidance = executor.resolve(first, seeds[0])
    estimate = executor.estimate_seconds(
        steps, first.width, first.height, len(requests), guidance_scale=guidance
    )
    return max(MIN_DURATION_S, int(estimate * DURATION_MARGIN) + 1)


@spaces.GPU(duration=gpu_duration)
def generate_on_gpu(requests: list[GenerateRequest], seeds: list[int]) -> list:
    """Run one batch of compatible requests; returns one PIL image per request."""
    executor = current_executor()
    if len(requests) == 1:
        return [executor.generate(requests[0], seeds[0])]
    return executor.generate_batch(requests, seeds)
