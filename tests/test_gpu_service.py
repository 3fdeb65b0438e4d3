"""The GPU tier's service and runner in process, with a fake clock and a fake model.

What a frontend sees through either GPU route, without HTTP: admission and its
refusals, the order of status updates, a caller who leaves, a model that fails,
a batch across clients, and a live model change, after which ``info`` must still
say exactly what the model was called with. The model is a stand-in that records
its calls and can be held on a gate, so every scenario is driven by conditions,
not by sleeping.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from PIL import Image

from splitspace.gpu_backend.admission.runner import GpuRunner
from splitspace.gpu_backend.admission.scheduler import FairScheduler
from splitspace.gpu_backend.serving.service import InferService
from splitspace.gpu_backend.stores.usage import MemoryUsageStore
from splitspace.gpu_backend.workload.batching import BatchOutcome, run_batch_isolating_failures
from splitspace.gpu_backend.workload.cost import CostModel
from splitspace.session.identity import Identity
from splitspace.session.token import IdentityTokens, infer_purpose
from splitspace.shared.contract.errors import QUEUE_FULL, GpuFailed, Throttled, Unauthorized, ValidationFailed
from splitspace.shared.contract.hop import Result, Status, Update
from splitspace.shared.contract.quotas import Tier
from splitspace.shared.contract.schema import GenerateRequest, Limits, request_from_dict

SECRET = "test-secret"
OPEN = Tier(weight=1, max_running=1, max_queued=3, gpu_seconds=1e6, window_s=3600)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeModel:
    """Records each pipeline call; ``gate`` (when set) holds the GPU thread until released."""

    name: str = "model-a"
    preset_steps: int = 2
    calls: list[list[GenerateRequest]] = field(default_factory=list)
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)

    def resolve(self, req: GenerateRequest) -> tuple[int, float]:
        return (
            req.steps if req.steps is not None else self.preset_steps,
            req.guidance_scale if req.guidance_scale is not None else 0.0,
        )

    def generate_batch(self, requests: list[GenerateRequest], seeds: list[int]) -> list[Image.Image]:
        self.calls.append(list(requests))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never released the model"
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("/secret/path/model.py exploded")
        return [
            Image.new("RGB", (r.width, r.height), (seed % 256, 0, 0)) for r, seed in zip(requests, seeds, strict=True)
        ]

    def generate(self, request: GenerateRequest, seed: int) -> Image.Image:
        return self.generate_batch([request], [seed])[0]

    def run_batch(self, requests: list[GenerateRequest], seeds: list[int], costs: list[float]) -> BatchOutcome:
        """What gpu.run_batch_on_gpu does around the model."""
        return run_batch_isolating_failures(self, requests, seeds, costs=costs)


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def batch_wait_s() -> float:
    return 0.0


@pytest.fixture
def service(model: FakeModel, batch_wait_s: float) -> Iterator[InferService]:
    clock = FakeClock()
    scheduler = FairScheduler(clock=clock, limits=lambda ref: OPEN, store=MemoryUsageStore(), capacity=1)
    runner = GpuRunner(
        scheduler,
        CostModel(lambda s, w, h, g, b: 0.1),
        run_batch=model.run_batch,
        resolve=model.resolve,
        model_name=lambda: model.name,
        max_batch=4,
        batch_wait_s=batch_wait_s,
        clock=clock,
    )
    yield InferService(
        tokens=IdentityTokens([SECRET]),
        runner=runner,
        limits=Limits(),
        standing=lambda identity: {"client": identity.client_id},
    )
    if model.gate is not None:
        model.gate.set()
    runner.close()


def body(**fields: object) -> dict[str, object]:
    return {"prompt": "a fox", "width": 64, "height": 64, "seed": 7, **fields}


def token(name: str, **fields: object) -> str:
    """A token for one /infer call with these fields, as the frontend mints it."""
    try:
        purpose = infer_purpose(request_from_dict(body(**fields)).digest())
    except ValidationFailed:
        purpose = infer_purpose("invalid")
    return IdentityTokens([SECRET]).mint(Identity(f"key:{name}", "key", "free", "127.0.0.1"), purpose)


async def collect(service: InferService, ticket) -> list[Update]:  # type: ignore[no-untyped-def]
    updates = service.follow(ticket)
    try:
        return [u async for u in updates]
    finally:
        await updates.aclose()


def admit(service: InferService, name: str, **fields: object):  # type: ignore[no-untyped-def]
    return service.admit(service.arrive(token(name, **fields)), body(**fields))


def test_refusals_are_the_projects_errors(service: InferService, model: FakeModel) -> None:
    model.gate = threading.Event()  # what is admitted stays running or queued

    async def scenario() -> None:
        with pytest.raises(Unauthorized, match="missing identity token"):
            service.arrive(None)
        with pytest.raises(Unauthorized, match="not valid"):
            service.arrive(IdentityTokens(["other"]).mint(Identity("key:x", "key", "free", "1.2.3.4"), "x"))
        with pytest.raises(ValidationFailed, match="width"):
            service.admit(service.arrive(token("alpha")), body(width=100))
        with pytest.raises(ValidationFailed, match="colour"):
            service.admit(service.arrive(token("alpha")), body(colour="red"))
        with pytest.raises(Unauthorized, match="another request"):
            service.admit(service.arrive(token("alpha", prompt="a cat")), body(prompt="a dog"))
        replayed = token("alpha")
        tickets = [service.admit(service.arrive(replayed), body())]  # running, held by the gate
        with pytest.raises(Unauthorized, match="already used"):
            service.arrive(replayed)
        tickets += [admit(service, "alpha") for _ in range(3)]  # + 3 queued: max_queued
        with pytest.raises(Throttled) as refused:
            admit(service, "alpha")
        assert refused.value.title == QUEUE_FULL and refused.value.retry_after_s >= 0
        for t in tickets[1:]:
            service.drop(t)
        model.gate.set()
        assert isinstance((await collect(service, tickets[0]))[-1], Result)

    asyncio.run(scenario())


def test_status_then_result_in_order(service: InferService, model: FakeModel) -> None:
    model.gate = threading.Event()

    async def scenario() -> list[Update]:
        first = admit(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        second = admit(service, "beta")
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
    assert isinstance(updates[-1], Result) and all(isinstance(u, Status) for u in updates[:-1])
    assert statuses and statuses[0].state == "queued" and statuses[0].position == 1
    assert statuses[0].cap == OPEN.max_running + OPEN.max_queued
    info = updates[-1].info
    assert (info.client, info.seed, info.width, info.steps, info.model) == ("key:beta", 7, 64, 2, "model-a")
    assert Image.open(io.BytesIO(updates[-1].image_png)).size == (64, 64)


def test_a_caller_who_leaves_never_runs(service: InferService, model: FakeModel) -> None:
    model.gate = threading.Event()

    async def scenario() -> None:
        first = admit(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        leaver = admit(service, "beta", prompt="never runs")
        updates = service.follow(leaver)
        await updates.aclose()  # the frontend closed the stream before the job started
        service.drop(leaver)
        model.gate.set()
        assert isinstance((await collect(service, first))[-1], Result)

    asyncio.run(scenario())
    assert [r.prompt for call in model.calls for r in call] == ["a fox"]
    assert len(service.runner.scheduler) == 0


def test_a_failing_model_is_a_gpu_error_without_internals(service: InferService, model: FakeModel) -> None:
    async def scenario() -> Update:
        with pytest.raises(GpuFailed) as failed:
            await collect(service, admit(service, "alpha", prompt="boom"))
        assert failed.value.user_text() == "GPU error: the model failed (RuntimeError)"
        assert "secret" not in failed.value.user_text()
        return (await collect(service, admit(service, "alpha")))[-1]

    assert isinstance(asyncio.run(scenario()), Result)  # and the next call runs


def test_a_batch_across_clients_keeps_each_request(service: InferService, model: FakeModel) -> None:
    model.gate = threading.Event()

    async def scenario() -> list[Update]:
        first = admit(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        tickets = [
            admit(service, name, seed=seed, prompt=f"p-{name}")
            for name, seed in (("beta", 11), ("gamma", 12), ("delta", 13))
        ]
        model.gate.set()
        await collect(service, first)
        return [(await collect(service, t))[-1] for t in tickets]

    results = asyncio.run(scenario())
    assert [len(call) for call in model.calls] == [1, 3]  # the three waiting jobs ran as one batch
    assert [(r.info.client, r.info.seed) for r in results] == [("key:beta", 11), ("key:gamma", 12), ("key:delta", 13)]
    assert [r.prompt for r in model.calls[1]] == ["p-beta", "p-gamma", "p-delta"]


def test_info_tells_the_truth_across_a_live_model_change(service: InferService, model: FakeModel) -> None:
    """A job admitted before a model change keeps the steps it was admitted (and charged)
    with, and runs on the new model; its info says both, as the model was called."""
    model.gate = threading.Event()

    async def scenario() -> tuple[Update, Update]:
        first = admit(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        before = admit(service, "beta")  # steps unset: model-a's preset, 2

        def change() -> None:
            model.name, model.preset_steps = "model-b", 1

        swap = asyncio.ensure_future(asyncio.to_thread(service.runner.swap, change))
        while not service.runner.paused:  # the swap holds dispatch: "before" cannot start on model-a
            await asyncio.sleep(0.01)
        model.gate.set()
        await collect(service, first)
        await swap
        after = admit(service, "gamma")  # steps unset: model-b's preset, 1
        return (await collect(service, before))[-1], (await collect(service, after))[-1]

    before, after = asyncio.run(scenario())
    assert isinstance(before, Result) and isinstance(after, Result)
    assert (before.info.model, before.info.steps) == ("model-b", 2)
    assert (after.info.model, after.info.steps) == ("model-b", 1)
    assert [r.steps for call in model.calls for r in call] == [2, 2, 1]  # what the model was called with


def test_a_random_seed_is_chosen_once(service: InferService, model: FakeModel) -> None:
    async def scenario() -> list[Update]:
        return await collect(service, admit(service, "alpha", seed=-1))

    result = asyncio.run(scenario())[-1]
    assert isinstance(result, Result)
    assert model.calls[0][0].seed == result.info.seed >= 0


def test_a_bad_request_in_a_batch_fails_alone(service: InferService, model: FakeModel) -> None:
    """The batch call fails; each request is run alone: the others get their images, and
    only the bad one gets the error."""
    model.gate = threading.Event()

    async def scenario() -> list[object]:
        first = admit(service, "alpha")
        assert await asyncio.to_thread(model.entered.wait, 5)
        tickets = [
            admit(service, name, prompt=prompt)
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
    assert isinstance(beta, Result) and isinstance(delta, Result) and isinstance(gamma, GpuFailed)
    assert [len(call) for call in model.calls] == [1, 3, 1, 1, 1]  # the batch, then each alone
    assert beta.info.gpu_s >= 0 and delta.info.gpu_s >= 0


@pytest.mark.parametrize("batch_wait_s", [10.0])
def test_the_batching_window_gathers_requests_that_arrive_in_it(service: InferService, model: FakeModel) -> None:
    """With a window, a request alone on an idle GPU waits for compatible ones to join it:
    four requests that arrive one after another run as one call (the window closes as soon
    as the batch is full, long before its 10 s)."""

    async def scenario() -> list[Update]:
        tickets = [admit(service, name, seed=i) for i, name in enumerate(("a", "b", "c", "d"))]
        return [(await collect(service, t))[-1] for t in tickets]

    results = asyncio.run(scenario())
    assert [len(call) for call in model.calls] == [4]
    assert [r.info.seed for r in results] == [0, 1, 2, 3]
