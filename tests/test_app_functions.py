"""A developer's GPU functions as workloads of the runner, in process.

The app is ``tests/apps/studio.py`` (and ``examples/shout.py``), loaded fresh for each
test. What is checked here is logic: a call's preprocessing and its refusals, its
estimate, batches with their isolation and charges, one fair queue shared by the
built-in app's ``generate`` and another app's functions, and the frontend's mock transport. The same
paths through real processes: ``test_app_tiers.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gradio import utils as gr_utils
from PIL import Image

from splitspace.gpu_backend.admission.runner import GpuRunner, Ticket
from splitspace.gpu_backend.admission.scheduler import FairScheduler
from splitspace.gpu_backend.serving.service import CallService
from splitspace.gpu_backend.stores.usage import MemoryUsageStore
from splitspace.gpu_backend.workload.app_functions import AppFunction, Prepared, app_functions
from splitspace.session.identity import Identity
from splitspace.session.token import IdentityTokens, call_purpose
from splitspace.shared.app.loader import gpu_endpoints, load_app
from splitspace.shared.contract.calls import FILE_KEY, Call, CallResult, CarriedFile
from splitspace.shared.contract.errors import (
    GpuFailed,
    SplitspaceError,
    Unauthorized,
    UnknownEndpoint,
    ValidationFailed,
)
from splitspace.shared.contract.quotas import Tier
from splitspace.shared.contract.schema import GenerateRequest
from tests.builtin_functions import StandInModel, builtin_functions
from tests.clients import generate_call

REPO = Path(__file__).resolve().parent.parent
STUDIO = str(REPO / "tests/apps/studio.py")
SHOUT = str(REPO / "examples/shout.py")
SECRET = "app-functions-secret"
ROOMY = Tier(weight=1, max_running=1, max_queued=20, gpu_seconds=1e6, window_s=3600)


def who(name: str) -> Identity:
    return Identity(f"key:{name}", "key", "free", "127.0.0.1")


@pytest.fixture
def fresh_apps() -> Iterator[None]:
    """Each test imports the apps anew (a frontend built in a test rewires their events)."""
    for name in ("studio", "shout"):
        sys.modules.pop(name, None)
    yield
    for name in ("studio", "shout"):
        sys.modules.pop(name, None)


@pytest.fixture
def functions(fresh_apps: None) -> dict[str, AppFunction]:
    endpoints = [*gpu_endpoints(load_app(STUDIO)), *gpu_endpoints(load_app(SHOUT))]
    return app_functions(endpoints, cache_dir=gr_utils.get_upload_folder(), max_file_bytes=10_000)


def carried_png(pixels: np.ndarray, name: str = "in.png") -> CarriedFile:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return CarriedFile(name, "image/png", buf.getvalue())


class ImageModel(StandInModel):
    """The built-in's model: an image per request; ``ran`` says when a batch ran."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[str] = []

    def generate_batch(self, requests: list[GenerateRequest], seeds: list[int]) -> list[Image.Image]:
        self.ran.append("image")
        return super().generate_batch(requests, seeds)


@pytest.fixture
def model() -> ImageModel:
    return ImageModel()


@pytest.fixture
def runner() -> Iterator[GpuRunner]:
    scheduler = FairScheduler(clock=time.monotonic, limits=lambda ref: ROOMY, store=MemoryUsageStore(), capacity=1)
    runner = GpuRunner(scheduler, clock=time.monotonic)
    yield runner
    runner.close()


async def answer(runner: GpuRunner, ticket: Ticket) -> Any:
    last = None
    async for update in runner.follow(ticket):
        last = update
    return last


async def until(check: Any, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# -- a call's inputs -------------------------------------------------------------------------
def test_prepare_preprocesses_inputs_and_estimates_with_the_decorators_duration(functions) -> None:
    work = functions["shout"].prepare(Call("shout", ["hi", 3]))
    assert work.payload == Prepared(["hi", 3]) and work.cost == pytest.approx(0.15) and work.batch_key is None
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    picture = functions["mirror"].prepare(Call("mirror", [carried_png(pixels)])).payload.args[0]
    assert isinstance(picture, np.ndarray) and (picture == pixels).all()  # the component's preprocess ran
    double = functions["double"].prepare(Call("double", [2]))
    assert double.batch_key == ("splitspace.call", "double") and double.cost == pytest.approx(0.1)
    assert functions["double"].max_batch() == 4 and functions["shout"].max_batch() == 1


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        (["a", "b"], "data", "expected 1 values"),
        ([{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}], "Picture", "carried as its bytes"),
        ([{FILE_KEY: {"name": "x.png", "size": 3, "sha256": "00"}}], "Picture", "without its bytes"),
        (
            [CarriedFile("x.png", "image/png", b"not a png")],
            "Picture",
            "could not be read",
        ),
        (
            [carried_png(np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8))],  # > 10,000 bytes
            "Picture",
            "over the limit",
        ),
    ],
)
def test_an_input_that_cannot_be_read_is_refused_naming_it(functions, data, field, says) -> None:
    endpoint = "stats" if field == "data" else "mirror"
    with pytest.raises(ValidationFailed, match=says) as refused:
        functions[endpoint].prepare(Call(endpoint, data))
    assert refused.value.field == field


# -- running a batch -------------------------------------------------------------------------
def test_a_batch_runs_as_one_call_with_gradio_batch_semantics(functions) -> None:
    outcome = functions["double"].run_batch([Prepared([2]), Prepared([5])], [0.1, 0.3])
    assert outcome.results == [[4, 2], [10, 2]] and not outcome.isolated
    assert sum(outcome.charges_s) == outcome.total_s and outcome.charges_s[1] == pytest.approx(3 * outcome.charges_s[0])


def test_a_failing_batch_is_run_again_one_call_at_a_time(functions) -> None:
    outcome = functions["double"].run_batch([Prepared([2]), Prepared([-1]), Prepared([5])], [0.1] * 3)
    assert outcome.isolated and outcome.results[0] == [4, 1] and outcome.results[2] == [10, 1]
    assert isinstance(outcome.results[1], ValueError) and outcome.failed == [1]
    assert sum(outcome.charges_s) == outcome.total_s


def test_a_generator_gives_its_last_yield(functions) -> None:
    assert functions["countdown"].run_batch([Prepared([3])], [0.1]).results == [["0"]]


# -- through the runner ----------------------------------------------------------------------
def test_built_in_and_app_work_share_one_fair_queue(functions, runner, model, tmp_path: Path) -> None:
    """While the GPU is held, one client queues three calls of a function, then another a
    built-in app's image: fair order runs the image after the first call, not after all three."""
    release = tmp_path / "release"
    ran = model.ran  # in the order the GPU thread runs them
    for name in ("hold", "nap"):
        event = functions[name].event

        def recorded(*args: Any, name: str = name, fn: Any = event.fn) -> Any:
            ran.append(name)
            return fn(*args)

        functions[name].event = dataclasses.replace(event, fn=recorded)

    async def scenario(generate: AppFunction) -> None:
        tickets = [runner.admit(who("c"), functions["hold"].prepare(Call("hold", [str(release)])))]
        assert await until(lambda: runner.scheduler.running_count == 1)
        tickets += [runner.admit(who("a"), functions["nap"].prepare(Call("nap", [1]))) for _ in range(3)]
        tickets.append(runner.admit(who("b"), generate.prepare(generate_call(seed=3))))
        release.touch()
        await asyncio.gather(*(answer(runner, t) for t in tickets))

    with builtin_functions(model) as builtin:
        asyncio.run(scenario(builtin["generate"]))
    assert ran == ["hold", "nap", "image", "nap", "nap"]


def test_a_call_is_charged_its_measured_gpu_time_and_answers_with_its_outputs(functions, runner) -> None:
    async def scenario() -> CallResult:
        ticket = runner.admit(who("a"), functions["nap"].prepare(Call("nap", [300])))
        return await answer(runner, ticket)

    result = asyncio.run(scenario())
    assert isinstance(result, CallResult) and result.data == ["rested"] and result.cap == 21
    assert result.info.endpoint == "nap" and result.info.client == "key:a" and result.info.gpu_s >= 0.3
    used = runner.scheduler.client_stats(runner.scheduler._seen["key:a"])["used"]
    assert used == pytest.approx(result.info.gpu_s, abs=1e-3)  # not the estimate (0.1 s)


def test_outputs_are_postprocessed_and_their_files_carried(functions, runner) -> None:
    pixels = (np.arange(4 * 6 * 3) % 251).astype(np.uint8).reshape(4, 6, 3)

    async def scenario() -> CallResult:
        work = await asyncio.to_thread(functions["mirror"].prepare, Call("mirror", [carried_png(pixels)]))
        return await answer(runner, runner.admit(who("a"), work))

    result = asyncio.run(scenario())
    carried = result.data[0]
    assert isinstance(carried, CarriedFile)
    got = np.asarray(Image.open(io.BytesIO(carried.data)).convert("RGB"))
    assert carried.mime_type == "image/png" and (got == pixels[:, ::-1]).all()


# -- through the service ---------------------------------------------------------------------
def test_the_service_names_an_unknown_function_and_binds_the_token_to_the_call(functions, runner) -> None:
    service = CallService(
        tokens=IdentityTokens([SECRET]),
        runner=runner,
        standing=lambda identity: {},
        functions=functions,
    )
    tokens = IdentityTokens([SECRET])

    def claims(call: Call) -> Any:
        return service.verify(tokens.mint(who("a"), call_purpose(call.digest())))

    async def scenario() -> None:
        with pytest.raises(UnknownEndpoint, match="'count'.*functions: countdown, double"):
            await service.enter_call(claims(Call("count", ["x"])), Call("count", ["x"]))
        with pytest.raises(Unauthorized, match="another request"):
            await service.enter_call(claims(Call("shout", ["hi", 2])), Call("shout", ["hi", 3]))
        with pytest.raises(SplitspaceError) as failed:
            ticket = await service.enter_call(claims(Call("fussy", ["bad"])), Call("fussy", ["bad"]))
            async for _ in service.follow(ticket):
                pass
        assert (failed.value.title, failed.value.message) == ("Fussy", "no bad words here")
        with pytest.raises(GpuFailed, match=r"^the function failed \(ValueError\)$"):
            ticket = await service.enter_call(claims(Call("fussy", ["boom"])), Call("fussy", ["boom"]))
            async for _ in service.follow(ticket):
                pass

    asyncio.run(scenario())


# -- the frontend without a GPU tier ---------------------------------------------------------
def test_the_frontend_forwards_a_gpu_event_through_the_mock_transport(fresh_apps: None, tmp_path: Path) -> None:
    from gradio_client import Client

    from splitspace.cpu_frontend.app import build_app
    from splitspace.cpu_frontend.hop.mock_transport import MockTransport
    from splitspace.shared.config.settings import Settings
    from tests.support import serve_in_thread

    mock = MockTransport(functions=gpu_endpoints(load_app(STUDIO)))  # read before the frontend rewires them
    settings = Settings(secret=SECRET, app=STUDIO, state_path=tmp_path / "state.sqlite3")
    with serve_in_thread(build_app(settings, [mock])) as url:
        client = Client(url, verbose=False)
        try:
            assert client.predict("hello", api_name="/stats") == ("HELLO", 5)
            assert client.predict("a b", api_name="/count") == 2
        finally:
            client.close()
    assert [call.endpoint for call, _ in mock.calls] == ["stats"]
    headers = mock.calls[0][1]
    claims = IdentityTokens([SECRET]).verify(headers["x-splitspace-identity"])
    assert claims.purpose == call_purpose(Call("stats", ["hello"]).digest())
