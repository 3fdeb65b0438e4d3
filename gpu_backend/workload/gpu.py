"""The GPU tier's model: loaded once, read by the built-in app at each call, changed live.

The built-in app (``builtin/text_to_image_app.py``) reads the model in use through
:func:`current_executor` and its batch cap through :func:`batch_cap`; its GPU function
runs under ``@spaces.GPU`` as any app's (``shared/app/gpu_function.py``), asking ZeroGPU
for :func:`zerogpu_duration` of its estimate, so short requests get ZeroGPU's better
queue priority and are charged only what they need. An operator's live model change
(``GpuTier.change_model``) swaps it here with the GPU idle.

The loaded model lives in a module global because a ZeroGPU worker reaches it
by inheritance, not through arguments; ``spaces`` must be imported before CUDA is
touched (this module is imported by the GPU tier before any model loads).
"""

from __future__ import annotations

import spaces  # (import before torch/CUDA: ZeroGPU requires it)

from splitspace.gpu_backend.workload.model import CompileConfig, ModelExecutor

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


def batch_cap(setting: int) -> int:
    """The most requests one call may take: the tier's setting, capped by the model's own."""
    return max(1, min(setting, current_executor().max_batch))


def zerogpu_duration(estimate_s: float) -> float:
    """Seconds to ask for a GPU call estimated at ``estimate_s``: on ZeroGPU, with the safety
    margin (a call past its duration is killed); elsewhere the estimate itself (admission's)."""
    if not spaces.config.Config.zero_gpu:
        return estimate_s
    return max(MIN_DURATION_S, int(estimate_s * DURATION_MARGIN) + 1)
