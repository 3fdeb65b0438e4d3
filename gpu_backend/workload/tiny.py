"""The ``tiny`` model: a small Stable Diffusion pipeline with random weights, built in code.

Why it exists: the tests and ``splitspace dev`` must run on machines that cannot
download anything (no Hugging Face Hub, no GPU), yet they should exercise the
real code path (tokenizer, text encoder, UNet, scheduler, VAE, PIL output)
rather than a stub. So every component here is built from a config with
seeded random weights: the same pipeline on every machine (for a given torch
version), nothing downloaded. Its images are noise; only their size, timing and
determinism mean anything.

Why this shape: it keeps Stable Diffusion's geometry (a VAE with 4 blocks, so
a scale factor of 8 and 4 latent channels: 64x64 latents at 512x512) so that
image sizes, latent shapes and batching behave as with the real model. It puts
attention only at the UNet's lower resolution and leaves it out of the VAE's
middle block: attention at full latent resolution is what makes diffusers'
tiny test configs take tens of seconds at 512x512 on a CPU (48 s for one
image on a 2-core CPU). About 1M UNet parameters, 0.17M VAE parameters and 33K text
encoder parameters; 2 steps at 512x512 take about 0.15 s on a 2-core CPU.

The tokenizer is CLIP's byte-level BPE with no merges: its vocabulary is the
256 byte symbols, each also with the ``</w>`` end-of-word suffix, plus the two
special tokens. Every text tokenizes (one token per byte); the only files
are the two it writes to a temporary folder and reads back at once.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SEED = 0
MAX_TOKENS = 77  # Stable Diffusion's prompt length, in tokens (with start and end).
TEXT_HIDDEN_SIZE = 32


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2, CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tiny_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer with a byte-level vocabulary and no merges (514 tokens).

    The vocabulary is written to a temporary folder as ``vocab.json`` and
    ``merges.txt`` and loaded from there: the one way to build it that transformers
    4 and 5 share (5 also takes the dict directly; 4 only reads files).
    """
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]:
        vocab[token] = len(vocab)
    with tempfile.TemporaryDirectory(prefix="splitspace-tiny-tokenizer-") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")  # the header line; no merges follow
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """A seeded, randomly initialised Stable Diffusion pipeline, float32 on the CPU.

    Each model is built right after ``torch.manual_seed(SEED)``, so its weights do
    not depend on the order of construction or on what ran before. Move it with
    ``pipe.to(device)`` if wanted.
    """
    tokenizer = build_tiny_tokenizer()

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        # For this class `attention_head_dim` is, historically, the number of heads
        # (diffusers refuses `num_attention_heads`): 2 heads of 32 channels. With 8
        # heads the self-attention over 32x32 tokens alone took 0.08 s per step at 512.
        attention_head_dim=2,
        norm_num_groups=32,
    )

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        # Few channels at the top resolution: at 512x512 the decoder's last block
        # runs on 512x512 pixels and dominates the VAE's time.
        block_out_channels=(4, 8, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=512,
        # No attention in the VAE's middle block: it would attend over every latent.
        mid_block_add_attention=False,
    )

    # Stable Diffusion's noise schedule (as in runwayml/stable-diffusion-v1-5 and
    # sd-turbo), with "trailing" spacing so that 1 or 2 steps start from pure noise.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="trailing",
    )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]  # diffusers: DiffusionPipeline's methods, unseen by mypy
    return pipe
