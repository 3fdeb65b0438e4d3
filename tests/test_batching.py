"""Batching across clients, the model's side: each request's own pixels, its own failure, its own charge."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitspace.gpu_backend.workload import gpu
from splitspace.gpu_backend.workload.batching import (
    BatchOutcome,
    run_isolating_failures,
    split_batch_time,
    zerogpu_batch_key,
)
from splitspace.gpu_backend.workload.model import ModelExecutor
from splitspace.shared.contract.schema import GenerateRequest
from tests.builtin_functions import builtin_functions
from tests.clients import generate_call

PROMPTS = ["a red fox in snow", "a lighthouse at dusk, oil painting", "cow"]
SEEDS = [11, 2**31 + 5, 0]


def req(prompt: str = "a lighthouse at dusk", **fields) -> GenerateRequest:
    fields.setdefault("width", 64)
    fields.setdefault("height", 64)
    return GenerateRequest(prompt=prompt, **fields)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def tiny() -> ModelExecutor:
    return ModelExecutor.from_spec("tiny", device="cpu")


@pytest.fixture(scope="module")
def arch_tiny() -> ModelExecutor:
    return ModelExecutor.from_spec("arch:sd-turbo@tiny", device="cpu")


# -- same seed, same pixels, in a batch or alone ------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "arch_tiny"])
def test_a_batch_of_three_clients_gives_each_the_pixels_it_gets_alone(model, request_fixture):
    executor = request_fixture(model)
    reqs = [req(p) for p in PROMPTS]
    batch = [pixels(image) for image in executor.generate_batch(reqs, SEEDS)]
    alone = [pixels(executor.generate(r, s)) for r, s in zip(reqs, SEEDS, strict=True)]
    # Not bit-equal on a CPU: oneDNN sums in a batch-size-dependent order, so the
    # float outputs differ by about 1e-6 (see the next test) and a pixel that sits
    # on a rounding boundary of the 0-255 conversion may move by 1.
    for together, single in zip(batch, alone, strict=True):
        assert np.abs(together - single).max() <= 1
        assert (together != single).mean() < 0.001
    for a, b in itertools.combinations(batch, 2):  # and each request really got its own image
        assert np.abs(a - b).mean() > 5


def test_batched_and_single_pipeline_outputs_agree_to_float_rounding(arch_tiny):
    import torch

    def run(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return arch_tiny.pipeline(
            prompt=prompts,
            width=64,
            height=64,
            num_inference_steps=1,
            guidance_scale=0.0,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        ).images

    batch = run(PROMPTS, SEEDS)
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        alone = run([prompt], [seed])[0]
        assert np.abs(batch[i] - alone).max() < 1e-4  # about 1e-6 measured, in [0, 1]
        assert np.abs(batch[i] - run([prompt], [seed + 1])[0]).max() > 0.1


# -- one bad request never fails another ----------------------------------------------------


class PoisonedPipeline:
    """The real pipeline, except that a call including the prompt "poison" raises."""

    def __init__(self, pipeline, fail_first_calls: int = 0) -> None:
        self.pipeline = pipeline
        self.calls: list[list[str]] = []
        self.fail_first_calls = fail_first_calls

    def __call__(self, **kwargs):
        self.calls.append(list(kwargs["prompt"]))
        if "poison" in kwargs["prompt"]:
            raise ValueError("the model cannot draw 'poison'")
        if len(self.calls) <= self.fail_first_calls:
            raise RuntimeError("CUDA out of memory (a transient failure)")
        return self.pipeline(**kwargs)


def poisoned(tiny: ModelExecutor, fail_first_calls: int = 0) -> ModelExecutor:
    return ModelExecutor(
        "tiny",
        tiny.preset,
        "cpu",
        is_placeholder=True,
        cost=tiny.cost,
        pipeline=PoisonedPipeline(tiny.pipeline, fail_first_calls),
    )


def run_batch_isolating_failures(model, requests, seeds, *, costs=None, clock=None) -> BatchOutcome:  # type: ignore[no-untyped-def]
    """The model's requests as one batch, each alone if that fails (``run_isolating_failures``,
    as the built-in app's ``generate`` runs on the GPU tier): a batch through
    ``model.generate_batch``, one request through ``model.generate``."""
    return run_isolating_failures(
        lambda items: model.generate_batch([r for r, _ in items], [s for _, s in items]),
        lambda item: model.generate(*item),
        list(zip(requests, seeds, strict=True)),
        costs=costs,
        **({"clock": clock} if clock is not None else {}),
    )


def ticking_clock(step: float = 1.0):
    """A clock that moves ``step`` seconds each time it is read."""
    counter = itertools.count()
    return lambda: next(counter) * step


def test_a_failing_request_fails_alone_and_pays_for_the_failed_batch(tiny):
    executor = poisoned(tiny)
    reqs = [req(PROMPTS[0]), req("poison"), req(PROMPTS[2])]
    seeds = [SEEDS[0], SEEDS[1], SEEDS[2]]

    outcome = run_batch_isolating_failures(executor, reqs, seeds, clock=ticking_clock())

    assert outcome.isolated
    assert outcome.failed == [1]
    assert isinstance(outcome.results[1], ValueError) and "poison" in str(outcome.results[1])
    for i in (0, 2):  # the others got their images, the very ones they get alone
        assert np.array_equal(pixels(outcome.results[i]), pixels(tiny.generate(reqs[i], seeds[i])))
    # One batch call, then one call per request.
    assert executor.pipeline.calls == [[r.prompt for r in reqs], [PROMPTS[0]], ["poison"], [PROMPTS[2]]]
    # The clock ticks 1 s per read: the failed batch took 1 s, each retry 1 s. The
    # culprit pays for the failed batch and its own retry; the others only their own.
    assert outcome.charges_s == [1.0, 2.0, 1.0]
    assert outcome.total_s == 4.0 == sum(outcome.charges_s)


def test_a_transient_batch_failure_is_shared_by_all_and_every_request_gets_its_image(tiny):
    executor = poisoned(tiny, fail_first_calls=1)
    reqs = [req(p) for p in PROMPTS]
    outcome = run_batch_isolating_failures(executor, reqs, SEEDS, clock=ticking_clock(0.5))
    assert outcome.isolated
    assert outcome.failed == []
    assert all(image.size == (64, 64) for image in outcome.results)
    # Failed batch: 0.5 s shared by three; then 0.5 s each alone.
    assert outcome.charges_s == pytest.approx([0.5 + 0.5 / 3] * 3)
    assert sum(outcome.charges_s) == outcome.total_s == 2.0


def test_a_batch_that_works_is_called_once_and_split_by_cost(tiny):
    executor = poisoned(tiny)
    reqs = [req(p) for p in PROMPTS]
    outcome = run_batch_isolating_failures(executor, reqs, SEEDS, costs=[1.0, 1.0, 2.0])
    assert not outcome.isolated
    assert len(executor.pipeline.calls) == 1
    assert outcome.failed == []
    assert outcome.total_s > 0
    assert sum(outcome.charges_s) == outcome.total_s
    assert outcome.charges_s[2] == pytest.approx(2 * outcome.charges_s[0])


def test_a_single_failing_request_is_not_retried(tiny):
    executor = poisoned(tiny)
    outcome = run_batch_isolating_failures(executor, [req("poison")], [1], clock=ticking_clock())
    assert executor.pipeline.calls == [["poison"]]
    assert outcome.failed == [0]
    assert outcome.charges_s == [1.0]


def test_an_interrupt_is_not_caught():
    class Interrupted:
        def generate(self, req, seed):
            raise KeyboardInterrupt

        def generate_batch(self, reqs, seeds):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch_isolating_failures(Interrupted(), [req(), req()], [1, 2])


def test_the_builtin_apps_gpu_function_returns_an_outcome_per_request(tiny):
    """The built-in app's ``generate`` as the GPU tier runs a batch of it: the batch fails,
    each call runs alone, and only the bad one gets its error."""
    executor = poisoned(tiny)
    with builtin_functions(executor, max_batch=16) as functions:
        generate = functions["generate"]
        calls = [generate_call(prompt=PROMPTS[0], seed=1), generate_call(prompt="poison", seed=2)]
        outcome = generate.run_batch([generate.prepare(call).payload for call in calls], [0.1, 0.1])
        assert isinstance(outcome, BatchOutcome)
        assert outcome.failed == [1] and outcome.isolated
        image, info = outcome.results[0]
        assert image.size == (64, 64) and info["seed"] == 1
        assert executor.pipeline.calls == [[PROMPTS[0], "poison"], [PROMPTS[0]], ["poison"]]
        assert gpu.batch_cap(16) == 4 == generate.max_batch()  # the CPU executor's own cap wins
        assert gpu.batch_cap(2) == 2


# -- the charges add up ------------------------------------------------------------------------


def test_split_batch_time_is_proportional_and_exact():
    assert split_batch_time([1.0, 1.0, 2.0], 0.4) == pytest.approx([0.1, 0.1, 0.2])
    assert sum(split_batch_time([1.0, 1.0, 1.0], 0.1)) == 0.1  # 0.1 / 3 * 3 != 0.1 in floats
    assert split_batch_time([0.0, 0.0], 1.0) == [0.5, 0.5]
    assert split_batch_time([3.0, 0.0], 1.0) == [1.0, 0.0]
    assert split_batch_time([1.0], 0.0) == [0.0]


@given(
    costs=st.lists(
        st.floats(min_value=0, max_value=1e4, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=40,
    ),
    gpu_s=st.floats(min_value=0, max_value=1e5, allow_nan=False, allow_infinity=False),
)
def test_split_batch_time_always_sums_exactly_to_the_measured_time(costs, gpu_s):
    shares = split_batch_time(costs, gpu_s)
    assert len(shares) == len(costs)
    assert sum(shares) == gpu_s
    assert sum(reversed(shares)) == gpu_s
    assert all(share >= 0 for share in shares)
    # Within one quantum (ulp(gpu_s)) of the exact proportion, computed in exact fractions.
    total = sum(Fraction(c) for c in costs)
    for cost, share in zip(costs, shares, strict=True):
        fair = Fraction(gpu_s) * (Fraction(cost) / total if total else Fraction(1, len(costs)))
        assert abs(Fraction(share) - fair) < Fraction(math.ulp(gpu_s))


@pytest.mark.parametrize(
    ("costs", "gpu_s", "named"),
    [
        ([], 1.0, "costs"),
        ([1.0, -1.0], 1.0, "cost"),
        ([math.nan], 1.0, "cost"),
        ([1.0], -0.1, "gpu_s"),
        ([1.0], math.inf, "gpu_s"),
    ],
)
def test_split_batch_time_refuses_bad_input_naming_it(costs, gpu_s, named):
    with pytest.raises(ValueError, match=named):
        split_batch_time(costs, gpu_s)


# -- ZeroGPU: one visitor per call -------------------------------------------------------------


def test_zerogpu_batch_key_keeps_visitors_apart_only_on_zerogpu():
    key = (512, 512, 1, 0.0)
    assert zerogpu_batch_key(key, client_id="session:a", ip_token="t1", on_zerogpu=False) == key
    assert zerogpu_batch_key(key, client_id="session:b", ip_token="t2", on_zerogpu=False) == key
    a = zerogpu_batch_key(key, client_id="session:a", ip_token="t1", on_zerogpu=True)
    assert a == zerogpu_batch_key(key, client_id="session:a", ip_token="t1", on_zerogpu=True)
    assert a != zerogpu_batch_key(key, client_id="session:b", ip_token="t1", on_zerogpu=True)
    assert a != zerogpu_batch_key(key, client_id="session:a", ip_token="t2", on_zerogpu=True)
    assert a != zerogpu_batch_key((512, 512, 2, 0.0), client_id="session:a", ip_token="t1", on_zerogpu=True)


@pytest.fixture
def request_fixture(request):
    """Look a fixture up by name (pytest's own ``request``)."""
    return request.getfixturevalue
