"""Streaming's logic, in process: a generator pulled and stopped on a worker thread, the
runner's partial outputs (in order, the newest kept for a slow reader), a caller who
leaves mid-stream, charges that accrue while a stream runs (and fair shares with streams
of mixed lengths, against the oracle), the time limit, and the frontend's handler.
The same through real processes: ``test_stream_tiers.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from gradio import utils as gr_utils

import splitspace
from splitspace.cpu_frontend.ui.app_events import LIVENESS_S, while_alive
from splitspace.gpu_backend.admission.fair_share import weighted_max_min
from splitspace.gpu_backend.admission.runner import PARTIALS_KEPT, GpuRunner, Ticket
from splitspace.gpu_backend.admission.scheduler import ClientRef, FairScheduler
from splitspace.gpu_backend.stores.usage import MemoryUsageStore
from splitspace.gpu_backend.workload.app_functions import AppFunction, app_functions
from splitspace.session.identity import Identity
from splitspace.shared.app.loader import gpu_endpoints
from splitspace.shared.app.processing import EventProcessing
from splitspace.shared.app.streaming import POLL_S, OverTime, Stopped, Yields
from splitspace.shared.contract.calls import Call, CallResult, Partial
from splitspace.shared.contract.errors import TimeLimitExceeded, from_wire, to_wire
from splitspace.shared.contract.hop import Status, call_update_from_wire
from splitspace.shared.contract.quotas import Tier

ROOMY = Tier(weight=1, max_running=1, max_queued=20, gpu_seconds=1e6, window_s=3600)
REPO = Path(__file__).resolve().parent.parent


def who(name: str) -> Identity:
    return Identity(f"key:{name}", "key", "free", "127.0.0.1")


# -- a generator on a worker thread ------------------------------------------------------------
def test_a_sync_generator_is_pulled_one_item_at_a_time_and_closed() -> None:
    closed: list[bool] = []

    def gen() -> Iterator[int]:
        try:
            yield from range(3)
        finally:
            closed.append(True)

    items = Yields(gen())
    assert next(items) == 0 and not closed
    assert list(items) == [1, 2]
    items.close()
    assert closed == [True]
    assert list(Yields("plain")) == ["plain"]  # a return value is one item


def test_a_stop_or_the_deadline_ends_it_between_items() -> None:
    stop, now = [False], [0.0]
    items = Yields((i for i in range(10)), should_stop=lambda: stop[0], deadline=5.0, clock=lambda: now[0])
    assert next(items) == 0
    stop[0] = True
    with pytest.raises(Stopped):
        next(items)
    items = Yields((i for i in range(10)), deadline=5.0, clock=lambda: now[0])
    assert next(items) == 0
    now[0] = 5.0
    with pytest.raises(OverTime):
        next(items)


def test_an_async_generator_is_stopped_while_it_awaits_and_its_finally_runs() -> None:
    """It awaits forever after its first item: the stop is noticed within a poll, not never."""
    stop = threading.Event()
    closed: list[bool] = []

    async def agen() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()
            yield 2
        finally:
            closed.append(True)

    items = Yields(agen(), should_stop=stop.is_set)
    assert next(items) == 1
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        next(items)
    assert time.monotonic() - t0 < 0.1 + 10 * POLL_S
    items.close()
    assert closed == [True]


# -- the runner ----------------------------------------------------------------------------------
class Gates:
    """What the test app's generators wait on and report, per test."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.produced = threading.Event()
        self.parked = threading.Event()
        self.closed = threading.Event()
        self.count = 0


def stream_app(gates: Gates) -> dict[str, AppFunction]:
    """A developer's app of generator functions, built here around ``gates``."""

    @splitspace.gpu(duration=0.05)
    def ticks(n: float) -> Iterator[str]:
        for i in range(int(n)):
            time.sleep(0.005)
            yield str(i)

    @splitspace.gpu(duration=0.05)
    def burst(n: float) -> Iterator[str]:
        """``n`` yields at once, then waits for the test: a reader slower than its generator."""
        for i in range(int(n)):
            yield str(i)
        gates.produced.set()
        gates.release.wait(30)
        yield "end"

    @splitspace.gpu(duration=0.05)
    def endless(every_ms: float) -> Iterator[str]:
        try:
            while True:
                gates.count += 1
                yield str(gates.count)
                time.sleep(every_ms / 1000)
        finally:
            gates.closed.set()

    @splitspace.gpu(duration=0.05)
    def long_then_park() -> Iterator[str]:
        """Works 0.6 s between its first two yields (past ``ACCRUE_EVERY_S``), then waits."""
        yield "a"
        time.sleep(0.6)
        yield "b"
        gates.parked.set()
        gates.release.wait(30)

    @splitspace.gpu(duration=0.05, time_limit=0.3)
    def runaway() -> Iterator[str]:
        try:
            while True:
                time.sleep(0.01)
                yield "more"
        finally:
            gates.closed.set()

    with gr.Blocks() as demo:
        n, out = gr.Number(), gr.Textbox()
        for fn in (ticks, burst, endless):
            gr.Button().click(fn, n, out, api_name=fn.__name__)
        gr.Button().click(long_then_park, None, out, api_name="long_then_park")
        gr.Button().click(runaway, None, out, api_name="runaway")
    return app_functions(gpu_endpoints(demo), cache_dir=gr_utils.get_upload_folder(), max_file_bytes=10_000)


@pytest.fixture
def gates() -> Iterator[Gates]:
    g = Gates()
    yield g
    g.release.set()


@pytest.fixture
def events() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture
def runner(events: list[tuple[str, dict[str, Any]]]) -> Iterator[GpuRunner]:
    scheduler = FairScheduler(clock=time.monotonic, limits=lambda ref: ROOMY, store=MemoryUsageStore(), capacity=1)
    r = GpuRunner(scheduler, clock=time.monotonic, on_event=lambda kind, data: events.append((kind, data)))
    yield r
    r.close()


def admit(runner: GpuRunner, functions: dict[str, AppFunction], name: str, *args: Any, client: str = "a") -> Ticket:
    return runner.admit(who(client), functions[name].prepare(Call(name, list(args))))


async def until(check: Callable[[], Any], timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def used(runner: GpuRunner, client: str) -> float:
    with runner.locked() as scheduler:
        return float(scheduler.client_stats(ClientRef(f"key:{client}", "key", "free", "127.0.0.1"))["used"])


def test_each_yield_is_a_partial_in_order_and_the_last_is_the_result(runner: GpuRunner, gates: Gates) -> None:
    functions = stream_app(gates)

    async def scenario() -> list[Any]:
        return [u async for u in runner.follow(admit(runner, functions, "ticks", 20))]

    updates = asyncio.run(scenario())
    partials = [u.data[0] for u in updates if isinstance(u, Partial)]
    result = updates[-1]
    assert isinstance(result, CallResult) and result.data == ["19"] and result.info.endpoint == "ticks"
    assert partials == [str(i) for i in range(len(partials))]  # in order, none twice
    assert len(partials) >= 10  # streamed as they came (the last may arrive as the result only)
    first = next(i for i, u in enumerate(updates) if isinstance(u, Partial))
    assert not any(isinstance(u, Status) for u in updates[first:])  # no statuses once it streams


def test_a_reader_slower_than_its_generator_gets_the_newest_yields(runner: GpuRunner, gates: Gates) -> None:
    functions = stream_app(gates)
    collapsed: list[int] = []

    async def scenario() -> list[Any]:
        ticket = admit(runner, functions, "burst", 5 * PARTIALS_KEPT)
        assert await until(gates.produced.is_set)
        buffer = ticket.waiter.partials
        assert buffer is not None
        assert await until(lambda: buffer.items and buffer.items[-1] == [str(5 * PARTIALS_KEPT - 1)])
        collapsed.append(buffer.collapsed)
        updates = []
        async for update in runner.follow(ticket):
            updates.append(update)
            if len(updates) == 1:
                gates.release.set()
        return updates

    updates = asyncio.run(scenario())
    yields = [u.data[0] for u in updates if isinstance(u, Partial)]
    if yields and yields[-1] == "end":  # the last yield may come as a partial too, before the end is known
        yields.pop()  # (the frontend never sends the result twice: core.follow_call)
    partials = [int(y) for y in yields]
    assert partials and len(partials) <= PARTIALS_KEPT and len(partials) + collapsed[0] >= 5 * PARTIALS_KEPT
    assert partials == sorted(partials) and partials[-1] == 5 * PARTIALS_KEPT - 1  # the newest, in order
    assert updates[-1].data == ["end"]


def test_a_caller_who_leaves_mid_stream_stops_it_and_the_next_job_runs(
    runner: GpuRunner, gates: Gates, events: list[tuple[str, dict[str, Any]]]
) -> None:
    functions = stream_app(gates)

    async def scenario() -> tuple[float, CallResult]:
        leaving = admit(runner, functions, "endless", 10, client="leaver")
        waiting = admit(runner, functions, "ticks", 2, client="next")
        updates = runner.follow(leaving)
        seen = 0
        async for update in updates:
            seen += isinstance(update, Partial)
            if seen == 3:
                break
        left = time.monotonic()
        await updates.aclose()  # the caller goes away
        result = None
        async for update in runner.follow(waiting):
            result = update
        assert isinstance(result, CallResult)
        return left, result

    left, result = asyncio.run(scenario())
    assert gates.closed.is_set() and result.data == ["1"]  # the generator was closed, the next ran
    assert result.info.queue_s > 0 and time.monotonic() - left < 5
    stopped = [data for kind, data in events if kind == "stopped"]
    assert len(stopped) == 1 and stopped[0]["gpu_s"] > 0
    assert used(runner, "leaver") == pytest.approx(stopped[0]["gpu_s"], abs=1e-6)  # charged what it used


def test_a_stream_is_charged_as_it_runs_then_settled(runner: GpuRunner, gates: Gates) -> None:
    functions = stream_app(gates)

    async def scenario() -> tuple[float, CallResult]:
        ticket = admit(runner, functions, "long_then_park")
        follow = asyncio.ensure_future(_last(runner.follow(ticket)))
        assert await until(gates.parked.is_set)
        while_running = used(runner, "a")
        gates.release.set()
        return while_running, await follow

    while_running, result = asyncio.run(scenario())
    assert while_running >= 0.6  # its estimate is 0.05 s; the time it used is charged before it ends
    assert used(runner, "a") == pytest.approx(result.info.gpu_s, abs=1e-3) and result.info.gpu_s >= while_running


async def _last(updates: AsyncIterator[Any]) -> Any:
    last = None
    async for update in updates:
        last = update
    return last


def test_a_runaway_generator_is_stopped_at_its_time_limit_and_frees_the_gpu(runner: GpuRunner, gates: Gates) -> None:
    functions = stream_app(gates)

    async def scenario() -> Any:
        runaway = admit(runner, functions, "runaway")
        after = admit(runner, functions, "ticks", 1, client="b")
        with pytest.raises(TimeLimitExceeded) as stopped:
            await _last(runner.follow(runaway))
        return stopped.value, await _last(runner.follow(after))

    error, after = asyncio.run(scenario())
    assert error.title == "Time limit" and "time limit of 0.3 s" in error.message
    assert gates.closed.is_set() and isinstance(after, CallResult) and after.data == ["0"]
    assert used(runner, "a") >= 0.3


def test_the_time_limit_comes_from_the_decorator_else_from_the_event() -> None:
    @splitspace.gpu
    def gen(x: str) -> Iterator[str]:
        yield x

    @splitspace.gpu(time_limit=3)
    def limited(x: str) -> Iterator[str]:
        yield x

    with gr.Blocks() as demo:
        box = gr.Textbox()
        gr.Button().click(gen, box, box, api_name="from_event", time_limit=7)
        gr.Button().click(limited, box, box, api_name="from_decorator", time_limit=7)
        gr.Button().click(gen, box, box, api_name="none")
    limits = {e.api_name: EventProcessing.of(e).time_limit for e in gpu_endpoints(demo)}
    assert limits == {"from_event": 7.0, "from_decorator": 3.0, "none": None}
    for bad in (0, -1, True, float("inf")):
        with pytest.raises(ValueError, match="time_limit"):
            splitspace.gpu(time_limit=bad)


def test_a_generators_admission_estimate_is_its_duration() -> None:
    import sys

    from splitspace.shared.app.loader import load_app

    sys.modules.pop("streams", None)
    try:
        functions = app_functions(
            gpu_endpoints(load_app(str(REPO / "tests/apps/streams.py"))),
            cache_dir=gr_utils.get_upload_folder(),
            max_file_bytes=10_000,
        )
    finally:
        sys.modules.pop("streams", None)
    work = functions["ticks"].prepare(Call("ticks", [20, 50, ""]))
    assert work.streams and work.batch_key is None and work.cost == pytest.approx(1.0)  # 20 chunks x 50 ms


def test_partials_and_the_time_limit_cross_the_hop() -> None:
    assert call_update_from_wire(Partial(["a", 1]).to_wire()) == Partial(["a", 1])
    error = from_wire(to_wire(TimeLimitExceeded.after(2.5)))
    assert isinstance(error, TimeLimitExceeded) and error.message == TimeLimitExceeded.after(2.5).message


# -- fair shares with streams of mixed lengths (the scheduler, in virtual time) ---------------
def simulate(
    lengths: dict[str, float],
    *,
    accrue: bool,
    window_s: float,
    capacity: int = 2,
    estimate_s: float = 1.0,
    every_s: float = 0.5,
    dt: float = 0.05,
) -> dict[str, float]:
    """Clients always backlogged with streams of their own length (each estimated at
    ``estimate_s``), ``capacity`` slots, each client up to two at once. Returns the GPU
    seconds each got within ``window_s``. A running stream accrues its time every ``every_s``."""
    now = [0.0]
    tier = Tier(weight=1, max_running=2, max_queued=100, gpu_seconds=1e12, window_s=1e9)
    scheduler = FairScheduler(
        clock=lambda: now[0], limits=lambda ref: tier, store=MemoryUsageStore(), capacity=capacity
    )
    refs = {name: ClientRef(f"key:{name}", "key", "t", "127.0.0.1") for name in lengths}
    got = dict.fromkeys(lengths, 0.0)
    running: dict[str, list[Any]] = {}  # job id -> [client, elapsed, last accrued]
    seq = iter(range(10**9))

    def submit(name: str) -> None:
        assert scheduler.submit(f"{name}-{next(seq)}", refs[name], estimate_s).ok

    for name in lengths:
        for _ in range(4):
            submit(name)
    for _ in range(round(window_s / dt)):
        while jobs := scheduler.dispatch():
            for job in jobs:
                running[job.job_id] = [job.client.client_id[4:], 0.0, 0.0]
        now[0] += dt
        for job_id, entry in list(running.items()):
            name = entry[0]
            entry[1] += dt
            got[name] += dt
            if entry[1] >= lengths[name] - 1e-9:
                scheduler.finish(job_id, entry[1])
                del running[job_id]
                submit(name)
            elif accrue and entry[1] - entry[2] >= every_s:
                assert scheduler.accrue(job_id, entry[1])
                entry[2] = entry[1]
    return got


def test_streams_of_mixed_lengths_get_the_fair_share_of_the_oracle() -> None:
    lengths = {"long": 3.0, "medium": 1.0, "short": 0.3}
    window = 120.0
    got = simulate(lengths, accrue=True, window_s=window)
    fair = weighted_max_min(dict.fromkeys(lengths, float("inf")), dict.fromkeys(lengths, 1.0), 2 * window)
    for name in lengths:  # within a few streams' length of the fair share
        assert abs(got[name] - fair[name]) <= 2 * max(lengths.values()), (got, fair)


def test_a_stream_longer_than_the_window_is_charged_as_it_runs_so_others_get_the_other_slot() -> None:
    """A client whose streams run 40 s (estimated 1 s) holds one slot (no preemption); its
    second stream gets the other slot only if its charge stays at the estimate while the
    first runs. With charges that accrue the others share that slot."""
    lengths = {"long": 40.0, "b": 0.5, "c": 0.5}
    window = 20.0
    got = simulate(lengths, accrue=True, window_s=window)
    assert got["long"] <= window + 1 and got["b"] + got["c"] >= window - 1, got
    unfair = simulate(lengths, accrue=False, window_s=window)
    assert unfair["long"] > 1.5 * window, unfair  # without it, both slots


def test_accrue_charges_a_running_job_and_finish_settles_the_rest() -> None:
    now = [0.0]
    store = MemoryUsageStore()
    scheduler = FairScheduler(clock=lambda: now[0], limits=lambda ref: ROOMY, store=store, capacity=1)
    ref = ClientRef("key:a", "key", "free", "127.0.0.1")
    assert scheduler.submit("j", ref, 1.0).ok and [j.job_id for j in scheduler.dispatch()] == ["j"]
    assert scheduler.client_stats(ref)["used"] == pytest.approx(1.0)  # the reservation
    assert scheduler.accrue("j", 0.5) and scheduler.client_stats(ref)["used"] == pytest.approx(1.0)
    assert scheduler.accrue("j", 2.5) and scheduler.client_stats(ref)["used"] == pytest.approx(2.5)
    service = scheduler._flows["key:a"].service
    assert service == pytest.approx(2.5)
    scheduler.finish("j", 3.0)
    assert scheduler.client_stats(ref)["used"] == pytest.approx(3.0)
    assert scheduler._flows["key:a"].service == pytest.approx(3.0)
    assert not scheduler.accrue("j", 4.0)  # finished: nothing to charge
    scheduler._check_invariants()


# -- the frontend's handler ----------------------------------------------------------------------
def test_a_handler_waiting_for_the_next_chunk_stops_when_its_caller_is_gone() -> None:
    closed: list[bool] = []

    async def slow() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.sleep(3600)
            yield 2
        finally:
            closed.append(True)

    async def scenario() -> tuple[list[int], float]:
        alive = [True]
        items = slow()
        got = []
        t0 = 0.0
        async for item in while_alive(items, lambda: alive[0]):
            got.append(item)
            alive[0] = False
            t0 = time.monotonic()
        return got, time.monotonic() - t0

    got, took = asyncio.run(scenario())
    assert got == [1] and closed == [True] and took < 10 * LIVENESS_S


def test_the_frontend_streams_through_the_mock_transport(tmp_path: Path) -> None:
    import sys

    from gradio_client import Client

    from splitspace.cpu_frontend.app import build_app
    from splitspace.cpu_frontend.hop.mock_transport import MockTransport
    from splitspace.shared.app.loader import load_app
    from splitspace.shared.config.settings import Settings
    from tests.support import serve_in_thread

    app = str(REPO / "tests/apps/streams.py")
    sys.modules.pop("streams", None)
    try:
        mock = MockTransport(functions=gpu_endpoints(load_app(app)))
        settings = Settings(secret="stream-secret", app=app, state_path=tmp_path / "state.sqlite3")
        with serve_in_thread(build_app(settings, [mock])) as url:
            client = Client(url, verbose=False)
            try:
                job = client.submit(10, 50, "", api_name="/ticks")
                chunks = [(time.time(), chunk) for chunk in job]
            finally:
                client.close()
    finally:
        sys.modules.pop("streams", None)
    assert [c.split()[0] for _, c in chunks] == [str(i) for i in range(10)]
    assert chunks[0][0] < float(chunks[-1][1].split()[1])  # the first arrived before the last was made
