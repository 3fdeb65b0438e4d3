"""The GPU tier's service and runner in process, with a fake clock and a fake model.

What a frontend sees through the GPU tier's call route, without HTTP, for the built-in
app's ``generate`` (``builtin/text_to_image_app.py``, an app like any other): admission and
its refusals, the order of status updates, a caller who leaves, a model that fails, a
batch across clients, and a live model change, after which the image's info must still
say exactly what the model was called with. The model is a stand-in that records its
calls and can be held on a gate, so every scenario is driven by conditions, not by
sleeping.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from splitspace.gpu_backend.admission.runner import GpuRunner, RunnerUpdate, Ticket
from splitspace.gpu_backend.admission.scheduler import FairScheduler
from splitspace.gpu_backend.serving.service import CallService
from splitspace.gpu_backend.stores.usage import MemoryUsageStore
from splitspace.session.identity import Identity
from splitspace.session.token import IdentityTokens, call_purpose
from splitspace.shared.contract.calls import Call, CallResult, CarriedFile
from splitspace.shared.contract.errors import QUEUE_FULL, GpuFailed, Throttled, Unauthorized, ValidationFailed
from splitspace.shared.contract.hop import Status
from splitspace.shared.contract.quotas import Tier
from splitspace.shared.contract.schema import GenerateRequest
from tests.builtin_functions import StandInModel, builtin_functions
from tests.clients import generate_call

SECRET = "test-secret"
OPEN = Tier(weight=1, max_running=1, max_queued=3, gpu_seconds=1e6, window_s=3600)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeModel(StandInModel):
    """Records each pipeline call; ``gate`` (when set) holds the GPU thread until released;
    a prompt "boom" makes the call raise."""

    name: str = "model-a"
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)

    def generate_batch(self, requests: list[GenerateRequest], seeds: list[int]) -> list[Image.Image]:
        images = super().generate_batch(requests, seeds)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never released the model"
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("/secret/path/model.py exploded")
        return images


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def batch_wait_s() -> float:
    return 0.0


@pytest.fixture
def service(model: FakeModel, batch_wait_s: float) -> Iterator[CallService]:
    clock = FakeClock()
    scheduler = FairScheduler(clock=clock, limits=lambda ref: OPEN, store=MemoryUsageStore(), capacity=1)
    runner = GpuRunner(scheduler, batch_wait_s=batch_wait_s, clock=clock)
    with builtin_functions(model, max_batch=4) as functions:
        yield CallService(
            tokens=IdentityTokens([SECRET]),
            runner=runner,
            standing=lambda identity: {"client": identity.client_id},
            functions=functions,
        )
        if model.gate is not None:
            model.gate.set()
        runner.close()


FIELDS: dict[str, Any] = {
    "prompt": "a fox",
    "width": 64,
    "height": 64,
    "steps": None,
    "guidance_scale": None,
    "seed": 7,
}
"""A call's fields unless a test says otherwise (steps and guidance unset: the model's preset)."""


def mint(name: str, call: Call) -> str:
    """A token for ``call``, as the frontend mints it."""
    return IdentityTokens([SECRET]).mint(
        Identity(f"key:{name}", "key", "free", "127.0.0.1"), call_purpose(call.digest())
    )


def token(name: str, **fields: object) -> str:
    """A token for one call of ``generate`` with these fields."""
    return mint(name, generate_call(**{**FIELDS, **fields}))


async def collect(service: CallService, ticket: Ticket) -> list[RunnerUpdate]:
    updates = service.follow(ticket)
    try:
        return [u async for u in updates]
    finally:
        await updates.aclose()


async def enter(service: CallService, name: str, token_fields: dict[str, Any] | None = None, **fields: Any) -> Ticket:
    """A call of ``generate`` with ``fields``, by ``name``'s key (its token bound to
    ``token_fields``, if given, else to the call)."""
    minted = token(name, **(fields if token_fields is None else token_fields))
    return await service.enter_call(service.arrive(minted), generate_call(**{**FIELDS, **fields}))


def info(update: RunnerUpdate) -> dict[str, Any]:
    """The image's info, as the built-in app reports it (its seed, size, steps, model; the
    call's timings and client)."""
    assert isinstance(update, CallResult), update
    return update.data[1]


def image(update: RunnerUpdate) -> Image.Image:
    assert isinstance(update, CallResult), update
    carried = update.data[0]
    assert isinstance(carried, CarriedFile), carried
    return Image.open(io.BytesIO(carried.data))


def test_refusals_are_the_projects_errors(service: CallService, model: FakeModel) -> None:
    model.gate = threading.Event()  # what is admitted stays running or queued

    async def scenario() -> None:
        with pytest.raises(Unauthorized, match="missing identity token"):
            service.arrive(None)
        with pytest.raises(Unauthorized, match="not valid"):
            service.arrive(IdentityTokens(["other"]).mint(Identity("key:x", "key", "free", "1.2.3.4"), "x"))
        with pytest.raises(ValidationFailed, match="width"):
            await enter(service, "alpha", width=100)
        with pytest.raises(ValidationFailed, match="expected 7 values"):
            short = Call("generate", generate_call(**FIELDS).data[:3])
            await service.enter_call(service.arrive(mint("alpha", short)), short)
        with pytest.raises(Unauthorized, match="another request"):
            await enter(service, "alpha", token_fields={"prompt": "a cat"}, prompt="a dog")
        replayed = token("alpha")
        tickets = [await service.enter_call(service.arrive(replayed), generate_call(**FIELDS))]  # running, held
        with pytest.raises(Unauthorized, match="already used"):
            service.arrive(replayed)
        tickets += [await enter(service, "alpha") for _ in range(3)]  # + 3 queued: max_queued
        with pytest.raises(Throttled) as refused:
            await enter(service, "alpha")
        assert refused.value.title == QUEUE_FULL and refused.value.retry_after_s >= 0
        for t in tickets[1:]:
            service.drop(t)
        model.gate.set()
        assert isinstance((await collect(service, tickets[0]))[-1], CallResult)

    asyncio.run(scenario())


def test_status_then_result_in_order(service: CallService, model: FakeModel) -> None:
    model.gate = threading.Event()

    async def scenario() -> list[RunnerUpdate]:
        first = await enter(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        second = await enter(service, "beta")
        updates = service.follow(second)
        try:
            told = await anext(updates)  # the waiter hears its place while the GPU is held
            model.gate.set()
            await collect(service, first)
            return [told] + [u async for u in updates]
        finally:
            await updates.aclose()

    updates = asyncio.run(scenario())
    statuses = [u for u in updates if isinstance(u, Status)]
    assert isinstance(updates[-1], CallResult) and all(isinstance(u, Status) for u in updates[:-1])
    assert statuses and statuses[0].state == "queued" and statuses[0].position == 1
    assert statuses[0].cap == OPEN.max_running + OPEN.max_queued
    said = info(updates[-1])
    assert (said["client"], said["seed"], said["width"], said["steps"], said["model"]) == (
        "key:beta",
        7,
        64,
        2,
        "model-a",
    )
    assert image(updates[-1]).size == (64, 64)


def test_a_caller_who_leaves_never_runs(service: CallService, model: FakeModel) -> None:
    model.gate = threading.Event()

    async def scenario() -> None:
        first = await enter(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        leaver = await enter(service, "beta", prompt="never runs")
        updates = service.follow(leaver)
        await updates.aclose()  # the frontend closed the stream before the job started
        service.drop(leaver)
        model.gate.set()
        assert isinstance((await collect(service, first))[-1], CallResult)

    asyncio.run(scenario())
    assert [r.prompt for call in model.calls for r in call] == ["a fox"]
    assert len(service.runner.scheduler) == 0


def test_a_failing_model_is_a_gpu_error_without_internals(service: CallService, model: FakeModel) -> None:
    async def scenario() -> RunnerUpdate:
        with pytest.raises(GpuFailed) as failed:
            await collect(service, await enter(service, "alpha", prompt="boom"))
        # the built-in is an app: its failure is worded as any app function's (the type only)
        assert failed.value.user_text() == "GPU error: the function failed (RuntimeError)"
        assert "secret" not in failed.value.user_text()
        return (await collect(service, await enter(service, "alpha")))[-1]

    assert isinstance(asyncio.run(scenario()), CallResult)  # and the next call runs


def test_a_batch_across_clients_keeps_each_request(service: CallService, model: FakeModel) -> None:
    model.gate = threading.Event()

    async def scenario() -> list[RunnerUpdate]:
        first = await enter(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        tickets = [
            await enter(service, name, seed=seed, prompt=f"p-{name}")
            for name, seed in (("beta", 11), ("gamma", 12), ("delta", 13))
        ]
        model.gate.set()
        await collect(service, first)
        return [(await collect(service, t))[-1] for t in tickets]

    results = asyncio.run(scenario())
    assert [len(call) for call in model.calls] == [1, 3]  # the three waiting jobs ran as one batch
    assert [(info(r)["client"], info(r)["seed"]) for r in results] == [
        ("key:beta", 11),
        ("key:gamma", 12),
        ("key:delta", 13),
    ]
    assert [image(r).getpixel((0, 0)) for r in results] == [(11, 0, 0), (12, 0, 0), (13, 0, 0)]  # each its own
    assert [r.prompt for r in model.calls[1]] == ["p-beta", "p-gamma", "p-delta"]


def test_info_tells_the_truth_across_a_live_model_change(service: CallService, model: FakeModel) -> None:
    """A job queued before a model change runs on the new model, with its preset (the
    built-in app reads the model at each call); its info says so, as the model was called."""
    model.gate = threading.Event()

    async def scenario() -> tuple[RunnerUpdate, RunnerUpdate]:
        first = await enter(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        before = await enter(service, "beta")  # steps unset

        def change() -> None:
            model.name, model.preset_steps = "model-b", 1

        swap = asyncio.ensure_future(asyncio.to_thread(service.runner.swap, change))
        while not service.runner.paused:  # the swap holds dispatch: "before" cannot start on model-a
            await asyncio.sleep(0.01)
        model.gate.set()
        await collect(service, first)
        await swap
        after = await enter(service, "gamma")  # steps unset: model-b's preset, 1
        return (await collect(service, before))[-1], (await collect(service, after))[-1]

    before, after = asyncio.run(scenario())
    assert (info(before)["model"], info(before)["steps"]) == ("model-b", 1)
    assert (info(after)["model"], info(after)["steps"]) == ("model-b", 1)
    assert [r.steps for call in model.calls for r in call] == [2, 1, 1]  # what the model was called with


def test_a_random_seed_is_chosen_once(service: CallService, model: FakeModel) -> None:
    async def scenario() -> list[RunnerUpdate]:
        return await collect(service, await enter(service, "alpha", seed=-1))

    result = asyncio.run(scenario())[-1]
    assert model.calls[0][0].seed == info(result)["seed"] >= 0
    assert image(result).getpixel((0, 0)) == (info(result)["seed"] % 256, 0, 0)


def test_a_bad_request_in_a_batch_fails_alone(service: CallService, model: FakeModel) -> None:
    """The batch call fails; each request is run alone: the others get their images, and
    only the bad one gets the error."""
    model.gate = threading.Event()

    async def scenario() -> list[object]:
        first = await enter(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        tickets = [
            await enter(service, name, prompt=prompt)
            for name, prompt in (("beta", "fine"), ("gamma", "boom"), ("delta", "also fine"))
        ]
        model.gate.set()
        await collect(service, first)
        outcomes: list[object] = []
        for t in tickets:
            try:
                outcomes.append((await collect(service, t))[-1])
            except GpuFailed as exc:
                outcomes.append(exc)
        return outcomes

    beta, gamma, delta = asyncio.run(scenario())
    assert isinstance(beta, CallResult) and isinstance(delta, CallResult) and isinstance(gamma, GpuFailed)
    assert [len(call) for call in model.calls] == [1, 3, 1, 1, 1]  # the batch, then each alone
    assert info(beta)["gpu_s"] >= 0 and info(delta)["gpu_s"] >= 0


@pytest.mark.parametrize("batch_wait_s", [10.0])
def test_the_batching_window_gathers_requests_that_arrive_in_it(service: CallService, model: FakeModel) -> None:
    """With a window, a request alone on an idle GPU waits for compatible ones to join it:
    four requests that arrive one after another run as one call (the window closes as soon
    as the batch is full, long before its 10 s)."""

    async def scenario() -> list[RunnerUpdate]:
        tickets = [await enter(service, name, seed=i) for i, name in enumerate(("a", "b", "c", "d"))]
        return [(await collect(service, t))[-1] for t in tickets]

    results = asyncio.run(scenario())
    assert [len(call) for call in model.calls] == [4]
    assert [info(r)["seed"] for r in results] == [0, 1, 2, 3]
