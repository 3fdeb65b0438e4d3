"""The built-in app's GPU function (``generate``) in process, around a test's own model.

The GPU tier serves the built-in text-to-image as an app (``builtin/text_to_image_app.py``),
whose ``generate`` reads the model in use from ``gpu.current_executor()``. The tests that
drive the runner or the service in process, without a real model, put a
:class:`StandInModel` there instead: it records each pipeline call and paints each image
with its seed, so a test can check who got which image and what the model was called with.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gradio import utils as gr_utils
from PIL import Image

from splitspace.builtin import APP
from splitspace.gpu_backend.workload import gpu
from splitspace.gpu_backend.workload.app_functions import AppFunction, app_functions
from splitspace.shared.app.loader import gpu_endpoints, load_app
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.schema import GenerateRequest

MODULE = "text_to_image_app"
"""The built-in app's module, as ``load_app`` imports it."""


@dataclass
class StandInModel:
    """What the built-in app reads of a model executor: its name, presets, estimate, batch cap,
    and one image per request (its red channel the request's seed). ``calls``: the requests of
    each pipeline call, in order."""

    name: str = "stand-in"
    preset_steps: int = 2
    max_batch: int = 16
    calls: list[list[GenerateRequest]] = field(default_factory=list)

    def resolve(self, req: GenerateRequest, seed: int | None = None) -> tuple[int, float]:
        return (
            req.steps if req.steps is not None else self.preset_steps,
            req.guidance_scale if req.guidance_scale is not None else 0.0,
        )

    def estimate_seconds(
        self, steps: int, width: int, height: int, batch: int = 1, *, guidance_scale: float = 0.0
    ) -> float:
        return 0.1 * batch

    def generate_batch(self, requests: list[GenerateRequest], seeds: list[int]) -> list[Image.Image]:
        self.calls.append(list(requests))
        return [
            Image.new("RGB", (r.width, r.height), (seed % 256, 0, 0)) for r, seed in zip(requests, seeds, strict=True)
        ]

    def generate(self, request: GenerateRequest, seed: int) -> Image.Image:
        return self.generate_batch([request], [seed])[0]


@contextlib.contextmanager
def builtin_functions(model: Any, *, max_batch: int = 1) -> Iterator[dict[str, AppFunction]]:
    """The built-in app's GPU functions (``generate``), loaded fresh, reading ``model`` as the
    model in use and ``max_batch`` as ``SPLITSPACE_MAX_BATCH``; the model in use before is
    back after."""
    previous = gpu._executor
    sys.modules.pop(MODULE, None)
    gpu.set_executor(model)
    try:
        functions = app_functions(
            gpu_endpoints(load_app(APP)), cache_dir=gr_utils.get_upload_folder(), max_file_bytes=10_000_000
        )
        sys.modules[MODULE].SETTINGS = Settings(max_batch=max_batch)  # type: ignore[attr-defined]
        yield functions
    finally:
        gpu._executor = previous
        sys.modules.pop(MODULE, None)
