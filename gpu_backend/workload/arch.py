"""Benchmark models with a real architecture: ``arch:sd-turbo`` and ``arch:sd15``, random weights.

Why it exists: what a GPU does per image depends on the shapes of the networks,
not on their weights, and the Hugging Face Hub is out of reach where splitspace
is built and benchmarked. So this module writes the published configurations
of two Stable Diffusion pipelines in code and builds them with seeded random
weights, nothing downloaded. Their images are noise: **for benchmarks only**.

- ``arch:sd-turbo``: Stable Diffusion 2.1's architecture as sd-turbo ships it
  (UNet 866M parameters with linear-projection transformers and 1024-wide cross
  attention, the SD VAE with 4 blocks of 128-512 channels, OpenCLIP ViT-H's text
  tower as a 23-layer ``CLIPTextModel``, 340M parameters), Euler with trailing
  timesteps; preset 1 step, guidance 0.
- ``arch:sd15``: Stable Diffusion 1.5 (UNet 860M parameters, 8 heads, 768-wide
  cross attention, CLIP ViT-L/14's text tower, 123M parameters), PNDM; preset
  25 steps, guidance 7.5.
- ``@tiny`` after either (``arch:sd-turbo@tiny``) keeps every block, layer and
  head of the architecture and divides every channel count by 8 (head size 8,
  8 norm groups): the same graph, about 1/60 of the compute, small enough for
  CI on a CPU.

The tokenizer is a stand-in, :func:`splitspace.gpu_backend.workload.tiny.build_tiny_tokenizer`
(byte-level, one token per byte, no merges): CLIP's 49,408-word vocabulary
would have to be downloaded. It pads and truncates to the same 77 tokens, so the
text encoder (whose embedding keeps the real vocabulary size) does exactly the
real work; only which ids a prompt becomes differs.

Weights: the modules are built with torch's initialisers switched off (with
them, building the full size takes about 16 s on a 2-core CPU, and transformers
initialises the text encoder a second time), then every parameter is filled
once from one seeded generator on the target device (about 10 s on that CPU): matrices and kernels uniform in
+-1/sqrt(fan_in) (torch's default bound), 1-D weights (norms) 1, biases 0. On
CUDA the modules are built on the device and cast to float16 there. The same
spec, device and torch version give the same weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar, cast

if TYPE_CHECKING:  # (torch, diffusers and transformers are imported when a pipeline is built)
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

M = TypeVar("M")

ARCH_PREFIX = "arch:"
SIZES = {"full": 1, "tiny": 8}
"""Channel divisors of the ``@SIZE`` suffix: ``full`` is the published model."""
SEED = 0

_SPEC = re.compile(r"^arch:([a-z0-9-]+)(?:@([a-z]+))?$")


@dataclass(frozen=True)
class Arch:
    """One pipeline's published configuration: the parts whose shapes set its cost."""

    unet_channels: tuple[int, ...]
    unet_heads: tuple[int, ...] | int
    """Heads per block (diffusers' historical ``attention_head_dim`` of UNet2DConditionModel)."""
    cross_attention_dim: int
    use_linear_projection: bool
    vae_channels: tuple[int, ...]
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_act: str
    text_projection: int
    scheduler: str
    latent_size: int
    """The UNet's ``sample_size``: the latent side it was trained at (image side / 8)."""
    norm_groups: int = 32


ARCHS: dict[str, Arch] = {
    # stabilityai/sd-turbo (SD 2.1's architecture at 512x512).
    "sd-turbo": Arch(
        unet_channels=(320, 640, 1280, 1280),
        unet_heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        vae_channels=(128, 256, 512, 512),
        text_hidden=1024,
        text_intermediate=4096,
        text_layers=23,
        text_heads=16,
        text_act="gelu",
        text_projection=512,
        scheduler="euler-trailing",
        latent_size=64,
    ),
    # runwayml/stable-diffusion-v1-5.
    "sd15": Arch(
        unet_channels=(320, 640, 1280, 1280),
        unet_heads=8,
        cross_attention_dim=768,
        use_linear_projection=False,
        vae_channels=(128, 256, 512, 512),
        text_hidden=768,
        text_intermediate=3072,
        text_layers=12,
        text_heads=12,
        text_act="quick_gelu",
        text_projection=768,
        scheduler="pndm",
        latent_size=64,
    ),
}

_HELP = f"expected 'arch:NAME' or 'arch:NAME@SIZE' with NAME one of {sorted(ARCHS)} and SIZE one of {sorted(SIZES)}"


def parse_arch_spec(spec: str) -> tuple[str, str]:
    """``(name, size)`` of an ``arch:`` spec; ValueError naming the spec otherwise."""
    match = _SPEC.match(spec)
    if not match or match.group(1) not in ARCHS or (match.group(2) or "full") not in SIZES:
        raise ValueError(f"model spec {spec!r}: {_HELP}")
    return match.group(1), match.group(2) or "full"


def scaled(arch: Arch, divisor: int) -> Arch:
    """The same blocks, layers and heads with every channel count divided by ``divisor``."""
    if divisor == 1:
        return arch
    return replace(
        arch,
        unet_channels=tuple(c // divisor for c in arch.unet_channels),
        cross_attention_dim=arch.cross_attention_dim // divisor,
        vae_channels=tuple(c // divisor for c in arch.vae_channels),
        text_hidden=arch.text_hidden // divisor,
        text_intermediate=arch.text_intermediate // divisor,
        text_projection=arch.text_projection // divisor,
        norm_groups=arch.norm_groups // 4,
    )


def build_arch_pipeline(spec: str, device: str = "cpu", *, seed: int = SEED) -> StableDiffusionPipeline:
    """The ``StableDiffusionPipeline`` of an ``arch:`` spec on ``device``, random weights.

    float16 on CUDA, float32 elsewhere. On ``device="meta"`` the networks have
    their shapes and no data (instant, no memory: for counting and inspecting).
    Raises ValueError for a spec that is not one.
    """
    name, size = parse_arch_spec(spec)
    arch = scaled(ARCHS[name], SIZES[size])

    import torch
    from diffusers import StableDiffusionPipeline

    from splitspace.gpu_backend.workload.tiny import MAX_TOKENS, build_tiny_tokenizer

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    meta = device == "meta"
    generator = None if meta else torch.Generator(device=device).manual_seed(seed)
    tokenizer = build_tiny_tokenizer()

    def made(build: Callable[[], M]) -> M:
        with _no_init(), torch.device(device):
            built = build()
        # diffusers' models are torch modules too (mypy cannot see it through their mixins)
        module = cast(torch.nn.Module, built)
        if not meta:
            _fill(module, generator)
        if dtype != torch.float32:  # (diffusers warns about any cast, even a no-op one)
            module = module.to(dtype=dtype)
        return cast(M, module.eval())  # (to() and eval() return the module itself)

    text_encoder = made(lambda: _text_encoder(arch, tokenizer, MAX_TOKENS))
    unet = made(lambda: _unet(arch))
    vae = made(lambda: _vae(arch))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(arch.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]  # diffusers: DiffusionPipeline's methods, unseen by mypy
    if not meta:  # anything a constructor placed on a fixed device joins the rest
        pipe = pipe.to(device)  # type: ignore[attr-defined]  # diffusers: DiffusionPipeline's methods, unseen by mypy
    return pipe


def parameter_counts(spec: str) -> dict[str, int]:
    """Parameters of each network of an ``arch:`` spec, counted on the meta device."""
    pipe = build_arch_pipeline(spec, "meta")
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}


# -- the components -----------------------------------------------------------


def _unet(arch: Arch) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=arch.unet_channels,
        layers_per_block=2,
        attention_head_dim=arch.unet_heads,
        cross_attention_dim=arch.cross_attention_dim,
        use_linear_projection=arch.use_linear_projection,
        norm_num_groups=arch.norm_groups,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _vae(arch: Arch) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=arch.vae_channels,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=arch.norm_groups,
        sample_size=arch.latent_size * 8,
        scaling_factor=0.18215,
    )


def _text_encoder(arch: Arch, tokenizer: CLIPTokenizer, max_tokens: int) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,  # CLIP's; the stand-in tokenizer uses its first 514 ids
            hidden_size=arch.text_hidden,
            intermediate_size=arch.text_intermediate,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            hidden_act=arch.text_act,
            projection_dim=arch.text_projection,
            max_position_embeddings=max_tokens,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _scheduler(kind: str) -> EulerDiscreteScheduler | PNDMScheduler:
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if kind == "euler-trailing":
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler(**common, steps_offset=1, timestep_spacing="trailing")
    from diffusers import PNDMScheduler

    return PNDMScheduler(**common, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)


# -- weights ------------------------------------------------------------------


def _no_init() -> AbstractContextManager[object]:
    """A context in which building a module leaves its parameters uninitialised."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]  # 4.x only
    return no_init_weights()


def _fill(module: torch.nn.Module, generator: torch.Generator | None) -> None:
    """Every parameter, once, in a fixed order: matrices and kernels uniform in
    +-1/sqrt(fan_in), 1-D weights (norm scales) 1, everything else (biases) 0."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                bound = 1.0 / math.sqrt(param[0].numel())
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
