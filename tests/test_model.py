"""The model executor: the offline ``tiny`` pipeline, ``sleep:MS``, the ``arch:`` benchmark
models, batch caps, the compiled UNet, presets and spec errors."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splitspace.gpu_backend.workload.arch import ARCHS, build_arch_pipeline, parameter_counts
from splitspace.gpu_backend.workload.model import (
    DEFAULT_PRESET,
    SLEEP_PRESET,
    TINY_PRESET,
    TURBO_PRESET,
    CompileConfig,
    ModelExecutor,
    Preset,
    padded_batch_sizes,
    preset_for,
)
from splitspace.shared.contract.schema import GenerateRequest

REPO_ROOT = Path(__file__).resolve().parents[1]


def request(**fields) -> GenerateRequest:
    fields.setdefault("prompt", "a lighthouse at dusk")
    fields.setdefault("width", 64)
    fields.setdefault("height", 64)
    return GenerateRequest(**fields)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def tiny() -> ModelExecutor:
    return ModelExecutor.from_spec("tiny", device="cpu")


# -- tiny ---------------------------------------------------------------------


def test_tiny_is_a_placeholder_with_its_preset(tiny):
    assert tiny.name == "tiny"
    assert tiny.device == "cpu"
    assert tiny.is_placeholder
    assert tiny.preset == TINY_PRESET == Preset(steps=2, guidance_scale=0.0)


def test_tiny_keeps_stable_diffusion_geometry(tiny):
    pipe = tiny.pipeline
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.in_channels == 4
    assert pipe.tokenizer.model_max_length == 77
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    vae_params = sum(p.numel() for p in pipe.vae.parameters())
    assert 0.5e6 < unet_params < 2e6
    assert vae_params < 0.5e6


def test_tiny_builds_identically_every_time(tiny):
    from splitspace.gpu_backend.workload.tiny import build_tiny_pipeline

    again = build_tiny_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        mine = getattr(tiny.pipeline, name).state_dict()
        theirs = getattr(again, name).state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].equal(theirs[key]), f"{name}.{key} differs between builds"


def test_tiny_tokenizer_takes_any_text(tiny):
    ids = tiny.pipeline.tokenizer("Ünïcode, emoji 🙂 and punctuation!").input_ids
    unk = tiny.pipeline.tokenizer.unk_token_id
    assert ids[0] == tiny.pipeline.tokenizer.bos_token_id
    assert ids[-1] == tiny.pipeline.tokenizer.eos_token_id
    assert unk not in ids[1:-1]


@pytest.mark.parametrize(("width", "height"), [(64, 64), (256, 128)])
def test_tiny_returns_the_requested_size(tiny, width, height):
    image = tiny.generate(request(width=width, height=height), seed=1)
    assert image.size == (width, height)
    assert image.mode == "RGB"


def test_tiny_same_seed_same_pixels_other_seed_other_pixels(tiny):
    req = request()
    first = pixels(tiny.generate(req, seed=42))
    again = pixels(tiny.generate(req, seed=42))
    other = pixels(tiny.generate(req, seed=43))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_tiny_negative_prompt_and_guidance(tiny):
    plain = pixels(tiny.generate(request(guidance_scale=0.0), seed=7))
    guided_req = request(guidance_scale=7.5, negative_prompt="blurry, low quality")
    guided = tiny.generate(guided_req, seed=7)
    assert guided.size == (64, 64)
    assert not np.array_equal(plain, pixels(guided))
    # With guidance <= 1 the negative prompt is not used, as in diffusers.
    ignored = pixels(tiny.generate(request(guidance_scale=0.0, negative_prompt="blurry"), seed=7))
    assert np.array_equal(plain, ignored)


def test_tiny_long_prompt_is_truncated_not_refused(tiny):
    image = tiny.generate(request(prompt="word " * 200), seed=3)
    assert image.size == (64, 64)


def test_resolve_applies_the_preset_only_where_the_request_is_silent(tiny):
    assert tiny.resolve(request(), seed=1) == (2, 0.0)
    assert tiny.resolve(request(steps=5), seed=1) == (5, 0.0)
    assert tiny.resolve(request(guidance_scale=3.0), seed=1) == (2, 3.0)
    steps, guidance = tiny.resolve(request(steps=1, guidance_scale=0), seed=1)
    assert (steps, guidance) == (1, 0.0)
    assert isinstance(guidance, float)


# -- batches ------------------------------------------------------------------


def test_generate_batch_returns_one_image_per_request(tiny):
    reqs = [
        request(prompt="a cat", width=128, height=64),
        request(prompt="a dog", width=128, height=64, negative_prompt="fur"),
        request(prompt="a cow", width=128, height=64),
    ]
    images = tiny.generate_batch(reqs, [1, 2, 3])
    assert len(images) == 3
    assert all(image.size == (128, 64) for image in images)


@pytest.mark.parametrize("guidance", [0.0, 7.5])
def test_generate_batch_matches_each_image_alone(tiny, guidance):
    # Each image starts from the latents of its own generator, so the batch gives
    # the same images as one call per request, up to float rounding: oneDNN's
    # convolutions sum in a batch-size-dependent order, so a few pixels may differ
    # by 1 of 255 on a CPU.
    reqs = [
        request(prompt="a cat", guidance_scale=guidance, negative_prompt="blurry"),
        request(prompt="a dog", guidance_scale=guidance),
    ]
    seeds = [11, 12]
    batch = [pixels(image) for image in tiny.generate_batch(reqs, seeds)]
    alone = [pixels(tiny.generate(req, seed)) for req, seed in zip(reqs, seeds, strict=True)]
    for together, single in zip(batch, alone, strict=True):
        assert np.abs(together - single).max() <= 2
        assert (together != single).mean() < 0.01
    assert not np.array_equal(batch[0], batch[1])


def test_generate_batch_refuses_incompatible_requests(tiny):
    with pytest.raises(ValueError, match="width, height, steps and guidance_scale"):
        tiny.generate_batch([request(width=64), request(width=128)], [1, 2])
    with pytest.raises(ValueError, match="width, height, steps and guidance_scale"):
        tiny.generate_batch([request(), request(steps=3)], [1, 2])
    with pytest.raises(ValueError, match="seeds"):
        tiny.generate_batch([request(), request()], [1])
    with pytest.raises(ValueError, match="empty"):
        tiny.generate_batch([], [])


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_generate_refuses_a_seed_out_of_range(tiny, seed):
    with pytest.raises(ValueError, match="seed"):
        tiny.generate(request(), seed=seed)


# -- sleep:MS -----------------------------------------------------------------


def test_sleep_returns_a_flat_image_after_ms():
    executor = ModelExecutor.from_spec("sleep:100")
    assert executor.name == "sleep:100"
    assert executor.is_placeholder
    assert executor.preset == SLEEP_PRESET
    start = time.perf_counter()
    image = executor.generate(request(width=96, height=48), seed=5)
    assert time.perf_counter() - start >= 0.1
    assert image.size == (96, 48)
    assert image.mode == "RGB"
    assert all(low == high for low, high in image.getextrema())  # one colour


def test_sleep_colour_comes_from_the_seed():
    executor = ModelExecutor.from_spec("sleep:0")
    same = executor.generate(request(), seed=5).getpixel((0, 0))
    again = executor.generate(request(prompt="something else"), seed=5).getpixel((0, 0))
    other = executor.generate(request(), seed=6).getpixel((0, 0))
    assert same == again
    assert same != other


def test_sleep_batch_holds_ms_once_and_returns_each_image():
    executor = ModelExecutor.from_spec("sleep:50")
    reqs = [request(width=64, height=128) for _ in range(3)]
    start = time.perf_counter()
    images = executor.generate_batch(reqs, [1, 2, 3])
    assert time.perf_counter() - start >= 0.05
    assert [image.size for image in images] == [(64, 128)] * 3
    assert executor.estimate_seconds(1, 64, 128, batch=3) == pytest.approx(0.05)


def test_sleep_spec_does_not_import_torch():
    code = (
        "import sys\n"
        "from gpu_backend.workload.model import ModelExecutor\n"
        "from shared.contract.schema import GenerateRequest\n"
        "req = GenerateRequest(prompt='x', width=64, height=64)\n"
        "ModelExecutor.from_spec('sleep:1').generate(req, 1)\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- specs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "sleep:abc",
        "sleep:-5",
        "sleep:",
        "sleep:1.5",
        "sleep:²",
        "",
        "   ",
        "/nonexistent/splitspace/model",
        "./no-such-model-folder",
        "not a model id!",
        "arch:",
        "arch:sdxl",
        "arch:sd-turbo@huge",
        "arch:sd-turbo@",
        "arch:SD-TURBO",
    ],
)
def test_bad_spec_raises_value_error_naming_it(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec.strip() or spec))):
        ModelExecutor.from_spec(spec)


def test_a_folder_that_is_no_pipeline_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path)))):
        ModelExecutor.from_spec(str(tmp_path), device="cpu")


def test_presets_follow_the_model_id():
    assert preset_for("tiny") == TINY_PRESET
    assert preset_for("sleep:100") == SLEEP_PRESET
    assert preset_for("stabilityai/sd-turbo") == TURBO_PRESET == Preset(1, 0.0)
    assert preset_for("stabilityai/sdxl-turbo") == TURBO_PRESET
    assert preset_for("runwayml/stable-diffusion-v1-5") == DEFAULT_PRESET == Preset(25, 7.5)
    assert preset_for("arch:sd-turbo") == preset_for("arch:sd-turbo@tiny") == TURBO_PRESET
    assert preset_for("arch:sd15") == preset_for("arch:sd15@tiny") == DEFAULT_PRESET


# -- cost model -------------------------------------------------------------------


def test_estimate_seconds_grows_with_work(tiny):
    base = tiny.estimate_seconds(2, 512, 512)
    assert 0 < base < 5
    assert tiny.estimate_seconds(4, 512, 512) > base
    assert tiny.estimate_seconds(2, 1024, 1024) > base
    assert tiny.estimate_seconds(2, 512, 512, batch=4) > base
    # Guidance above 1 runs the UNet twice per image.
    assert tiny.estimate_seconds(2, 512, 512, guidance_scale=7.5) > base
    assert tiny.estimate_seconds(2, 512, 512, guidance_scale=1.0) == base


# -- arch: real architectures, random weights ------------------------------------------


@pytest.fixture(scope="module")
def sd_turbo() -> ModelExecutor:
    # The full-size architecture: about 20-30 s and 5.5 GB to build on a 2-core CPU.
    return ModelExecutor.from_spec("arch:sd-turbo", device="cpu")


@pytest.fixture(scope="module")
def sd_turbo_tiny() -> ModelExecutor:
    return ModelExecutor.from_spec("arch:sd-turbo@tiny", device="cpu")


def test_arch_parameter_counts_are_the_published_ones():
    # Stable Diffusion 2.1 / sd-turbo and 1.5, as their published checkpoints count them.
    assert parameter_counts("arch:sd-turbo") == {
        "unet": 865_910_724,
        "vae": 83_653_863,
        "text_encoder": 340_387_840,
    }
    assert parameter_counts("arch:sd15") == {
        "unet": 859_520_964,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
    }


def test_arch_tiny_keeps_every_block_layer_and_head():
    narrowed = {"block_out_channels", "cross_attention_dim", "norm_num_groups"}
    for name in ARCHS:
        full = build_arch_pipeline(f"arch:{name}", "meta")
        tiny = build_arch_pipeline(f"arch:{name}@tiny", "meta")
        for part in ("unet", "vae"):
            a, b = dict(getattr(full, part).config), dict(getattr(tiny, part).config)
            same_a = {k: v for k, v in a.items() if k not in narrowed}
            same_b = {k: v for k, v in b.items() if k not in narrowed}
            assert same_a == same_b, f"{name} {part}"
            assert [c // 8 for c in a["block_out_channels"]] == list(b["block_out_channels"])
            assert len(list(getattr(full, part).modules())) == len(list(getattr(tiny, part).modules()))
        for field in ("num_hidden_layers", "num_attention_heads", "hidden_act"):
            assert getattr(tiny.text_encoder.config, field) == getattr(full.text_encoder.config, field)
    assert parameter_counts("arch:sd-turbo@tiny")["unet"] < 865_910_724 / 50


def test_arch_sd_turbo_full_size_makes_a_64px_image_on_a_cpu(sd_turbo):
    assert sd_turbo.name == "arch:sd-turbo"
    assert sd_turbo.is_placeholder  # random weights: noise, for benchmarks
    assert sd_turbo.preset == TURBO_PRESET
    assert sd_turbo.pipeline.unet.config.cross_attention_dim == 1024
    assert sd_turbo.pipeline.text_encoder.config.num_hidden_layers == 23
    assert sd_turbo.pipeline.tokenizer.model_max_length == 77
    first = pixels(sd_turbo.generate(request(), seed=5))
    assert first.shape == (64, 64, 3)
    assert first.std() > 1  # not a flat (or NaN-black) image
    assert np.array_equal(first, pixels(sd_turbo.generate(request(), seed=5)))
    assert not np.array_equal(first, pixels(sd_turbo.generate(request(), seed=6)))


def test_arch_builds_the_same_weights_every_time(sd_turbo_tiny):
    again = ModelExecutor.from_spec("arch:sd-turbo@tiny", device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        mine = getattr(sd_turbo_tiny.pipeline, name).state_dict()
        theirs = getattr(again.pipeline, name).state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].equal(theirs[key]), f"{name}.{key} differs between builds"
    assert np.array_equal(pixels(sd_turbo_tiny.generate(request(), seed=9)), pixels(again.generate(request(), seed=9)))


def test_arch_sd15_tiny_has_its_preset_and_runs_with_guidance():
    sd15 = ModelExecutor.from_spec("arch:sd15@tiny", device="cpu")
    assert sd15.resolve(request()) == (25, 7.5)
    # 2 of the preset's 25 steps: the same calls, a tenth of the time.
    image = sd15.generate(request(negative_prompt="blurry", width=64, height=96, steps=2), seed=2)
    assert image.size == (64, 96)
    assert pixels(image).std() > 1


# -- batch caps -------------------------------------------------------------------------


class CountingPipeline:
    """A pipeline that records the size of each call and passes it on."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.calls: list[int] = []

    def __call__(self, **kwargs):
        self.calls.append(len(kwargs["prompt"]))
        return self.pipeline(**kwargs)


def test_max_batch_defaults_per_device_and_spec(tiny):
    assert tiny.max_batch == 4  # a CPU
    assert ModelExecutor.from_spec("sleep:1").max_batch == 16
    assert ModelExecutor.from_spec("sleep:1", max_batch=3).max_batch == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            ModelExecutor.from_spec("sleep:1", max_batch=bad)


def test_a_batch_over_max_batch_runs_as_several_calls_of_at_most_max_batch(tiny):
    capped = ModelExecutor(
        "tiny",
        TINY_PRESET,
        "cpu",
        is_placeholder=True,
        pipeline=CountingPipeline(tiny.pipeline),
        cost=tiny.cost,
        max_batch=2,
    )
    seeds = [1, 2, 3, 4, 5]
    images = capped.generate_batch([request(prompt=f"p{s}") for s in seeds], seeds)
    assert capped.pipeline.calls == [2, 2, 1]
    assert len(images) == 5
    alone = pixels(tiny.generate(request(prompt="p5"), seed=5))
    assert np.abs(pixels(images[4]) - alone).max() <= 1


def test_fixed_batch_sizes_pad_a_batch_and_drop_the_padding(tiny):
    padded = ModelExecutor(
        "tiny",
        TINY_PRESET,
        "cpu",
        is_placeholder=True,
        pipeline=CountingPipeline(tiny.pipeline),
        cost=tiny.cost,
        max_batch=4,
        batch_sizes=(1, 2, 4),
    )
    seeds = [7, 8, 9]
    images = padded.generate_batch([request(prompt=f"p{s}") for s in seeds], seeds)
    assert padded.pipeline.calls == [4]
    assert len(images) == 3
    alone = pixels(tiny.generate(request(prompt="p9"), seed=9))
    assert np.abs(pixels(images[2]) - alone).max() <= 1
    with pytest.raises(ValueError, match="batch_sizes"):
        ModelExecutor(
            "tiny",
            TINY_PRESET,
            "cpu",
            is_placeholder=True,
            pipeline=tiny.pipeline,
            cost=tiny.cost,
            max_batch=4,
            batch_sizes=(1, 2),
        )


# -- compiled UNet -----------------------------------------------------------------------


def test_padded_batch_sizes_are_powers_of_two_up_to_the_cap():
    assert padded_batch_sizes(16) == (1, 2, 4, 8, 16)
    assert padded_batch_sizes(6) == (1, 2, 4, 6)
    assert padded_batch_sizes(1) == (1,)


def test_compiled_unet_is_warmed_up_at_every_padded_size_and_then_never_recompiles(tiny):
    # Inductor needs about 75 s per shape for this model on a 2-core CPU, so the test
    # compiles with dynamo only: a backend that records each graph it is given and
    # runs it as traced (what backend="eager" does). The plumbing, the padding to
    # fixed shapes and the warm-up are the real ones.
    import torch

    graphs: list[tuple] = []

    def recording_backend(gm, example_inputs):
        graphs.append(tuple(tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)))
        return gm.forward

    torch._dynamo.reset()
    config = CompileConfig(width=64, height=64, backend=recording_backend)
    compiled = ModelExecutor.from_spec("tiny", device="cpu", max_batch=2, compile_unet=config)
    assert compiled.batch_sizes == (1, 2)
    assert isinstance(compiled.pipeline.unet, torch._dynamo.eval_frame.OptimizedModule)
    # The latents of a 64x64 image: (batch, 4, 8, 8); each fixed size was compiled in the warm-up.
    latent_batches = {shape[0] for shapes in graphs for shape in shapes if shape[1:] == (4, 8, 8)}
    assert latent_batches == {1, 2}
    warmed = len(graphs)

    seeds = [3, 4]
    images = compiled.generate_batch([request(prompt=f"p{s}") for s in seeds], seeds)
    single = compiled.generate(request(prompt="p3"), seed=3)
    assert len(graphs) == warmed  # served at the warmed size: nothing compiled again
    assert [image.size for image in images] == [(64, 64)] * 2
    eager = pixels(tiny.generate(request(prompt="p3"), seed=3))
    assert np.abs(pixels(single) - eager).max() <= 1
    assert np.abs(pixels(images[0]) - eager).max() <= 1


def test_compile_config_picks_cuda_graphs_only_on_cuda():
    assert CompileConfig().mode_for("cuda") == "reduce-overhead"
    assert CompileConfig().mode_for("cuda:1") == "reduce-overhead"
    assert CompileConfig().mode_for("cpu") == "default"
    assert CompileConfig(mode="max-autotune").mode_for("cuda") == "max-autotune"
