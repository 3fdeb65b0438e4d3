"""The model executor: turns a validated request and a seed into a PIL image.

One class, :class:`ModelExecutor`, built once from a model spec (the
``SPLITSPACE_MODEL`` setting) and then called synchronously, one call at a time, by the GPU
tier's scheduler:

- ``tiny``: the seeded random-weight Stable Diffusion pipeline of
  :mod:`gpu_backend.workload.tiny`, float32. For tests and local runs; images are noise.
- ``sleep:MS``: no model. Each call holds the executor for MS milliseconds and
  returns a flat image whose colour comes from the seed. For load and fairness
  benchmarks.
- ``arch:sd-turbo``, ``arch:sd15`` (``@tiny`` for a narrow copy): a real
  architecture with seeded random weights, built in code by
  :mod:`gpu_backend.workload.arch`. For GPU benchmarks; images are noise.
- anything else: a diffusers model id or local folder, loaded with
  ``AutoPipelineForText2Image.from_pretrained`` (float16 on CUDA).

Determinism: every image gets its own ``torch.Generator(device="cpu")`` seeded
with its seed, so the same (request, seed) gives the same pixels on a given
machine and device, and a batch gives each image the latents it would get alone.
The images of a batch then equal the images made one by one up to float
rounding (kernels sum in a batch-size-dependent order): on a CPU in float32 the
pipelines' outputs differ by about 1e-6, so a pixel near a rounding boundary may
be off by 1 of 255.

Batches: ``max_batch`` caps how many requests one call takes (a default per
spec and device; the GPU tier uses the smaller of it and its own setting).
With ``compile_unet`` (a :class:`CompileConfig`), the UNet goes through
``torch.compile`` (CUDA graphs on CUDA), batches are padded up to one of a few
fixed sizes (powers of two up to ``max_batch``) so that shapes stay fixed, and
every one of those sizes is warmed up at the configured image size at start.

Importing this module loads no model and does not import torch or diffusers;
they are imported inside :meth:`ModelExecutor.from_spec`, so ``sleep:`` specs
start instantly. On ZeroGPU, import ``spaces`` before calling ``from_spec``:
it checks ``torch.cuda.is_available()`` when no device is given.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from splitspace.shared.contract.schema import MAX_SEED, GenerateRequest

log = logging.getLogger("splitspace.gpu")

TINY = "tiny"
SLEEP_PREFIX = "sleep:"
ARCH_PREFIX = "arch:"
PLACEHOLDER_LOG = (
    "model %s is a placeholder for testing (%s). Set SPLITSPACE_MODEL (e.g. stabilityai/sd-turbo) for real images"
)
"""Operators' information, in the GPU tier's log (the public page only says the images are noise)."""

_SPEC_HELP = (
    "expected 'tiny', 'sleep:MS' (MS a whole number of milliseconds, 0 or more), "
    "'arch:sd-turbo' or 'arch:sd15' (optionally '@tiny'), "
    "a diffusers model id such as 'stabilityai/sd-turbo', or a local pipeline folder"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class Preset:
    """Defaults for a request's ``steps`` and ``guidance_scale`` when it leaves them None."""

    steps: int
    guidance_scale: float


TINY_PRESET = Preset(steps=2, guidance_scale=0.0)
SLEEP_PRESET = Preset(steps=1, guidance_scale=0.0)
TURBO_PRESET = Preset(steps=1, guidance_scale=0.0)  # sd-turbo, sdxl-turbo: distilled, no guidance
DEFAULT_PRESET = Preset(steps=25, guidance_scale=7.5)


def preset_for(spec: str) -> Preset:
    """The preset of a model spec (no loading, no checking)."""
    if spec == TINY:
        return TINY_PRESET
    if spec.startswith(SLEEP_PREFIX):
        return SLEEP_PRESET
    if spec.startswith(ARCH_PREFIX + "sd15"):
        return DEFAULT_PRESET
    lowered = spec.lower()
    if "sd-turbo" in lowered or "sdxl-turbo" in lowered:
        return TURBO_PRESET
    return DEFAULT_PRESET


@dataclass(frozen=True)
class CostCurve:
    """The shape of a model's cost (the built-in app's ``duration``: its admission estimate).

    Seconds for one pipeline call of ``batch`` images of ``pixels`` each::

        fixed_s + steps * (step_s + step_pixel_s * unet_images * pixels) + pixel_s * batch * pixels

    ``unet_images`` is ``batch``, doubled when guidance > 1 (classifier-free
    guidance runs the UNet on the prompt and on the negative prompt). The last
    term is the text encoder, the VAE decode and the PIL conversion.
    """

    fixed_s: float
    step_s: float
    step_pixel_s: float
    pixel_s: float

    def seconds(self, steps: int, pixels: int, batch: int, unet_images: int) -> float:
        unet = steps * (self.step_s + self.step_pixel_s * unet_images * pixels)
        return self.fixed_s + unet + self.pixel_s * batch * pixels


# The tiny pipeline on a 2-core CPU, float32. Measured with 2 steps, batch 1:
# 0.02 s at 64x64, 0.055 s at 256, 0.15 s at 512, 0.94 s at 1024 (attention over
# 128x128 latents makes 1024 costlier than this model says).
TINY_CPU_COST = CostCurve(fixed_s=0.010, step_s=0.006, step_pixel_s=1.5e-7, pixel_s=2.5e-7)
# The tiny pipeline on a GPU: not measured; a launch-bound guess (about 60 small
# kernels per UNet step). Calibrate at run time.
TINY_CUDA_COST = CostCurve(fixed_s=0.010, step_s=0.008, step_pixel_s=1e-10, pixel_s=2e-9)
# A Stable Diffusion 2.1-sized model (UNet 866M parameters) in float16 on a GPU:
# a least-squares fit (in relative error) to the 23 cells of the H200 table in
# docs/gpu.md, every cell within 23% (13% RMS). About 34 ms per step at
# batch 1 whatever the size: the GPU waits on kernel launches. The per-image term
# (VAE decode, PIL) is most of what a larger batch adds.
SD_CUDA_COST = CostCurve(fixed_s=0.020, step_s=0.034, step_pixel_s=7.8e-9, pixel_s=7.8e-8)
PRETRAINED_CUDA_COST = SD_CUDA_COST
# The same model in float32 on a CPU: an order-of-magnitude guess (seconds per step);
# arch:sd-turbo measured 1.0 s for one 64x64 image in 1 step on a 2-core CPU.
PRETRAINED_CPU_COST = CostCurve(fixed_s=0.5, step_s=0.1, step_pixel_s=3e-5, pixel_s=5e-5)
# arch:*@tiny in float32 on a 2-core CPU, 1 step, batch 1: 0.09 s at 64x64, 1.2 s at
# 512x512 (self-attention over every latent at the top UNet level).
ARCH_TINY_CPU_COST = CostCurve(fixed_s=0.06, step_s=0.02, step_pixel_s=3.5e-6, pixel_s=7e-7)

DEFAULT_MAX_BATCH_CUDA = 16
"""On a GPU images/s still grow from batch 8 to 16 (40.0 to 49.9 on an H100; docs/gpu.md)."""
DEFAULT_MAX_BATCH_CPU = 4
"""On a CPU a batch saves little (compute bound); a cap keeps one call short."""
SLEEP_MAX_BATCH = 16


@dataclass(frozen=True)
class CompileConfig:
    """Serve a compiled UNet (opt-in): ``torch.compile`` at fixed shapes, warmed up at start.

    For an operator who serves one image size: each padded batch size is compiled
    (and, on CUDA, captured as a CUDA graph) once at ``width`` x ``height`` with
    the preset's steps and guidance; another size or guidance compiles again on
    first use, which takes as long as the warm-up did. Not for ZeroGPU (no GPU
    outside ``@spaces.GPU`` calls, so no warm-up at start).
    """

    width: int = 512
    height: int = 512
    mode: str | None = None
    """torch.compile's mode; None: "reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere."""
    backend: str | Callable[..., Any] = "inductor"
    """torch.compile's backend; "eager" traces with dynamo only (fast; for tests)."""

    def mode_for(self, device: str) -> str:
        if self.mode is not None:
            return self.mode
        return "reduce-overhead" if device.startswith("cuda") else "default"


class ModelExecutor:
    """Runs one model: build it with :meth:`from_spec`, then call :meth:`generate`.

    Not for concurrent use: calls are serialised by a lock, as on one GPU (a
    diffusers pipeline keeps per-call state in its scheduler).
    """

    def __init__(
        self,
        name: str,
        preset: Preset,
        device: str,
        *,
        is_placeholder: bool,
        pipeline: Any = None,
        sleep_ms: int | None = None,
        cost: CostCurve | None = None,
        max_batch: int | None = None,
        batch_sizes: tuple[int, ...] | None = None,
    ) -> None:
        """``max_batch`` None: the default for the device (or ``sleep:``). ``batch_sizes``:
        the fixed sizes a batch is padded up to (a compiled UNet); None: no padding."""
        if (pipeline is None) == (sleep_ms is None):
            raise ValueError("give exactly one of `pipeline` and `sleep_ms`")
        if pipeline is not None and cost is None:
            raise ValueError("a pipeline needs a `cost` model for estimate_seconds")
        if max_batch is None:
            max_batch = default_max_batch(device, sleep=sleep_ms is not None)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"`max_batch` must be a whole number, 1 or more, got {max_batch!r}")
        if batch_sizes is not None and (not batch_sizes or max(batch_sizes) < max_batch):
            raise ValueError(f"`batch_sizes` {batch_sizes!r} must reach `max_batch` {max_batch}")
        self.name = name
        self.preset = preset
        self.device = device
        self.is_placeholder = is_placeholder
        self.pipeline = pipeline
        self.sleep_ms = sleep_ms
        self.cost = cost
        self.max_batch = max_batch
        self.batch_sizes = tuple(sorted(batch_sizes)) if batch_sizes else None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ModelExecutor(name={self.name!r}, device={self.device!r}, preset={self.preset}, "
            f"max_batch={self.max_batch})"
        )

    # -- construction ---------------------------------------------------------

    @classmethod
    def from_spec(
        cls,
        spec: str,
        device: str | None = None,
        *,
        max_batch: int | None = None,
        compile_unet: CompileConfig | None = None,
    ) -> ModelExecutor:
        """Build (load, once) the executor for a model spec.

        ``device`` None means "cuda" when torch sees a GPU, else "cpu" (``sleep:``
        specs never import torch and report "cpu"). ``max_batch`` None: the
        default for the device. ``compile_unet``: compile the UNet and warm it up
        before returning (ignored by ``sleep:``, which has none). A spec that
        cannot be a model raises ValueError naming it.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"model spec {spec!r} is empty: {_SPEC_HELP}")
        spec = spec.strip()

        if spec.startswith(SLEEP_PREFIX):
            sleep_ms = _parse_sleep_ms(spec)
            log.warning(PLACEHOLDER_LOG, spec, "it only waits; its images are flat")
            return cls(
                spec,
                SLEEP_PRESET,
                device or "cpu",
                is_placeholder=True,
                sleep_ms=sleep_ms,
                max_batch=max_batch,
            )

        if spec.startswith(ARCH_PREFIX):
            from splitspace.gpu_backend.workload.arch import build_arch_pipeline, parse_arch_spec

            _, size = parse_arch_spec(spec)  # ValueError naming the spec, before importing torch
            device = device or _default_device()
            pipeline = build_arch_pipeline(spec, device)
            on_cuda = device.startswith("cuda")
            if size == "full":
                cost = SD_CUDA_COST if on_cuda else PRETRAINED_CPU_COST
            else:
                cost = TINY_CUDA_COST if on_cuda else ARCH_TINY_CPU_COST
            preset, placeholder = preset_for(spec), True
        elif spec == TINY:
            from splitspace.gpu_backend.workload.tiny import build_tiny_pipeline

            device = device or _default_device()
            pipeline = build_tiny_pipeline().to(device)  # type: ignore[attr-defined]  # diffusers: DiffusionPipeline's methods, unseen by mypy
            cost = TINY_CUDA_COST if device.startswith("cuda") else TINY_CPU_COST
            preset, placeholder = TINY_PRESET, True
        else:
            device = device or _default_device()
            pipeline = _load_pretrained(spec, device)
            cost = PRETRAINED_CUDA_COST if device.startswith("cuda") else PRETRAINED_CPU_COST
            preset, placeholder = preset_for(spec), False

        if placeholder:
            log.warning(PLACEHOLDER_LOG, spec, "random weights; its images are noise")
        batch_sizes = None
        if compile_unet is not None:
            max_batch = max_batch or default_max_batch(device, sleep=False)
            batch_sizes = padded_batch_sizes(max_batch)
            _compile_unet(pipeline, device, compile_unet)
        executor = cls(
            spec,
            preset,
            device,
            is_placeholder=placeholder,
            pipeline=pipeline,
            cost=cost,
            max_batch=max_batch,
            batch_sizes=batch_sizes,
        )
        if compile_unet is not None:
            executor.warm_up(compile_unet.width, compile_unet.height)
        return executor

    def warm_up(self, width: int, height: int) -> dict[int, float]:
        """One call per padded batch size at ``width`` x ``height`` with the preset's
        steps and guidance (compiles each shape); seconds per batch size."""
        req = GenerateRequest(prompt="warm-up", width=width, height=height)
        took: dict[int, float] = {}
        for size in self.batch_sizes or (1,):
            start = time.perf_counter()
            self.generate_batch([req] * size, list(range(size)))
            took[size] = time.perf_counter() - start
        log.info(
            "%s warmed up at %dx%d: %s",
            self.name,
            width,
            height,
            ", ".join(f"batch {b} {s:.1f} s" for b, s in took.items()),
        )
        return took

    # -- requests -------------------------------------------------------------

    def resolve(self, req: GenerateRequest, seed: int | None = None) -> tuple[int, float]:
        """The (steps, guidance_scale) a request runs with: its own, else the preset's.

        ``seed`` does not change the answer; it is accepted so that callers can
        pass the same arguments as to :meth:`generate`.
        """
        steps = self.preset.steps if req.steps is None else req.steps
        guidance = self.preset.guidance_scale if req.guidance_scale is None else req.guidance_scale
        return int(steps), float(guidance)

    def generate(self, req: GenerateRequest, seed: int) -> Image.Image:
        """One image of exactly ``req.width`` x ``req.height``; same seed, same pixels."""
        return self.generate_batch([req], [seed])[0]

    def generate_batch(self, reqs: list[GenerateRequest], seeds: list[int]) -> list[Image.Image]:
        """Several compatible requests in one pipeline call, one seeded generator each.

        Compatible means the same width, height, steps and guidance scale (after
        :meth:`resolve`); prompts, negative prompts and seeds may differ. Each
        image starts from the latents it would get alone. A ``sleep:`` executor
        holds MS once for the whole batch. More than ``max_batch`` requests run
        as several calls of at most ``max_batch``.
        """
        self._check_batch(reqs, seeds)
        images: list[Image.Image] = []
        for start in range(0, len(reqs), self.max_batch):
            end = start + self.max_batch
            images += self._call(reqs[start:end], seeds[start:end])
        return images

    def _call(self, reqs: list[GenerateRequest], seeds: list[int]) -> list[Image.Image]:
        """One pipeline call (a checked batch of at most ``max_batch``)."""
        steps, guidance = self.resolve(reqs[0])
        width, height = reqs[0].width, reqs[0].height
        wanted = len(reqs)
        if self.batch_sizes is not None:  # fixed shapes for a compiled UNet: pad, drop later
            size = next(b for b in self.batch_sizes if b >= wanted)
            reqs = reqs + [reqs[-1]] * (size - wanted)
            seeds = seeds + [seeds[-1]] * (size - wanted)

        with self._lock:
            if self.sleep_ms is not None:
                time.sleep(self.sleep_ms / 1000)
                return [_flat_image(width, height, seed) for seed in seeds]

            import torch

            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
            negative_prompts = [req.negative_prompt for req in reqs]
            result = self.pipeline(
                prompt=[req.prompt for req in reqs],
                negative_prompt=negative_prompts if any(negative_prompts) else None,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="pil",
            )
        images = list(result.images)[:wanted]
        for image in images:
            if image.size != (width, height):  # a pipeline that rounds sizes would be a bug here
                raise RuntimeError(
                    f"model {self.name!r} returned a {image.size[0]}x{image.size[1]} image "
                    f"for a {width}x{height} request"
                )
        return images

    def estimate_seconds(
        self,
        steps: int,
        width: int,
        height: int,
        batch: int = 1,
        *,
        guidance_scale: float | None = None,
    ) -> float:
        """Expected seconds for one call of ``batch`` images (a rough model: admission's estimate).

        ``guidance_scale`` None means the preset's; above 1 it doubles the UNet's work.
        """
        if self.sleep_ms is not None:
            return self.sleep_ms / 1000
        guidance = self.preset.guidance_scale if guidance_scale is None else guidance_scale
        unet_images = batch * 2 if guidance > 1 else batch
        assert self.cost is not None  # a pipeline comes with one (__init__)
        return self.cost.seconds(steps, width * height, batch, unet_images)

    def _check_batch(self, reqs: list[GenerateRequest], seeds: list[int]) -> None:
        if not reqs:
            raise ValueError("`reqs` is empty: give at least one request")
        if len(seeds) != len(reqs):
            raise ValueError(f"`seeds` has {len(seeds)} entries for {len(reqs)} requests")
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise ValueError(f"`seed` must be an integer from 0 to {MAX_SEED}, got {seed!r}")
        first = (reqs[0].width, reqs[0].height, *self.resolve(reqs[0]))
        for req in reqs[1:]:
            other = (req.width, req.height, *self.resolve(req))
            if other != first:
                raise ValueError(
                    f"requests in one batch must share width, height, steps and guidance_scale, got {first} and {other}"
                )


# -- helpers ------------------------------------------------------------------


def default_max_batch(device: str, *, sleep: bool = False) -> int:
    """The batch cap of a model on ``device`` when none is given."""
    if sleep:
        return SLEEP_MAX_BATCH
    return DEFAULT_MAX_BATCH_CUDA if device.startswith("cuda") else DEFAULT_MAX_BATCH_CPU


def padded_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The fixed batch sizes of a compiled UNet: powers of two below ``max_batch``, and it."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def _compile_unet(pipeline: Any, device: str, config: CompileConfig) -> None:
    import torch

    pipeline.unet = torch.compile(pipeline.unet, mode=config.mode_for(device), backend=config.backend, dynamic=False)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _parse_sleep_ms(spec: str) -> int:
    text = spec[len(SLEEP_PREFIX) :].strip()
    if not re.fullmatch(r"[0-9]+", text):  # refuses "abc", "-5", "1.5" and ""
        raise ValueError(f"model spec {spec!r}: MS must be a whole number of milliseconds, 0 or more")
    return int(text)


def _flat_image(width: int, height: int, seed: int) -> Image.Image:
    """A single-colour RGB image; the colour depends only on the seed."""
    rng = random.Random(seed)
    colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    return Image.new("RGB", (width, height), colour)


def _looks_like_path(spec: str) -> bool:
    return (
        os.path.isabs(spec) or spec.startswith(("./", "../", "~", ".\\", "..\\")) or spec.count("/") > 1 or "\\" in spec
    )


def _load_pretrained(spec: str, device: str) -> Any:
    """A diffusers text-to-image pipeline from a local folder or a model id."""
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        source = local
    elif _looks_like_path(spec):
        raise ValueError(f"model spec {spec!r}: no such folder; {_SPEC_HELP}")
    elif _REPO_ID.match(spec):
        source = spec
    else:
        raise ValueError(f"model spec {spec!r} is not a model id or a folder; {_SPEC_HELP}")

    import torch
    from diffusers import AutoPipelineForText2Image

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        pipeline = AutoPipelineForText2Image.from_pretrained(source, torch_dtype=dtype)
    except Exception as exc:
        raise ValueError(
            f"model spec {spec!r}: could not load it with AutoPipelineForText2Image ({type(exc).__name__}: {exc})"
        ) from exc
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
