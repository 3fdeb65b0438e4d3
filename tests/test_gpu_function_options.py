"""The decorator's options for batch functions and reported outputs, in-process:
``batch_key`` (which calls share a batch), ``max_batch_size`` as a function (read at each
batch), ``report`` (the outputs a caller gets, from the call's measured info), and the same
function run in one process (``python app.py``), where ``report`` is told the time
measured there."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import gradio as gr
import pytest

import splitspace
from splitspace.gpu_backend.workload.app_functions import app_functions
from splitspace.gpu_backend.workload.work import Timing
from splitspace.shared.app import gpu_function as gpu_function_module
from splitspace.shared.app.gpu_function import LOCAL_CLIENT, gpu_function
from splitspace.shared.app.loader import gpu_endpoints
from splitspace.shared.contract.calls import Call, CallInfo

CAP = [3]


def with_cost(outputs: list[Any], info: CallInfo) -> list[Any]:
    return [f"{outputs[0]} ({info.client}, {info.gpu_s} s)"]


@splitspace.gpu(batch=True, max_batch_size=lambda: CAP[0], batch_key=lambda text: len(text), report=with_cost)
def upper(text: list[str]) -> list[list[str]]:
    return [[t.upper() for t in text]]


def blocks() -> gr.Blocks:
    with gr.Blocks() as demo:
        box, out = gr.Textbox(), gr.Textbox()
        gr.on([], upper, box, out, api_name="upper", batch=True)
    return demo


def test_the_options_are_checked_when_the_function_is_decorated() -> None:
    with pytest.raises(ValueError, match="batch_key"):
        splitspace.gpu(batch_key=lambda x: x)(lambda x: x)  # needs batch=True
    with pytest.raises(ValueError, match="report"):
        splitspace.gpu(report="no")(lambda x: x)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_batch_size"):
        splitspace.gpu(batch=True, max_batch_size=0)(lambda x: x)


def test_the_batch_cap_is_read_at_each_batch_and_a_bad_one_counts_as_one() -> None:
    record = gpu_function(upper)
    assert record is not None
    CAP[0] = 5
    assert record.batch_cap() == 5
    CAP[0] = 0
    assert record.batch_cap() == 1
    CAP[0] = 3


def test_only_calls_with_equal_keys_share_a_batch_and_report_gets_the_measured_info(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setattr(gpu_function_module, "_tier_reports", False)
    fn = app_functions(gpu_endpoints(blocks()), cache_dir=str(tmp_path), max_file_bytes=10**6)["upper"]
    a, b, c = (fn.prepare(Call("upper", [text])) for text in ("ab", "cd", "xyz"))
    assert a.batch_key == b.batch_key != c.batch_key
    assert fn.max_batch() == 3
    outcome = fn.run_batch([a.payload, b.payload], [1.0, 1.0])
    assert [r for r in outcome.results] == [["AB"], ["CD"]]  # the tier reports, not the function
    timing = Timing(0.0, 0.5, 0.25, "key:alpha", "upper", time.time)
    answer = asyncio.run(fn.finish(a.payload, outcome.results[0], timing))  # type: ignore[arg-type]
    assert answer.data == ["AB (key:alpha, 0.25 s)"]


def test_in_one_process_the_function_reports_the_time_measured_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_function_module, "_tier_reports", False)
    (out,) = upper(["ab", "c"])
    assert [o.split(" (")[0] for o in out] == ["AB", "C"]
    assert all(f"({LOCAL_CLIENT}, " in o for o in out)


# -- the page's backend in an app (builtin/page.py: AppPage, refusal_of) -----------------
def test_a_refusal_is_worded_from_the_projects_error_and_the_callers_door() -> None:
    from splitspace.builtin.page import refusal_of
    from splitspace.shared.app.services import DoorView
    from splitspace.shared.contract.errors import QUEUE_FULL, Throttled, ValidationFailed

    def raised(exc: Exception) -> gr.Error:
        try:
            try:
                raise exc
            except Exception as inner:
                raise gr.Error(str(inner), title="x") from None
        except gr.Error as outer:
            return outer

    door = DoorView(in_flight=3, shared_address=True, seconds_per_job=4.0)
    full = refusal_of(raised(Throttled(QUEUE_FULL, "you have 3 requests in flight", 0.5)), door)
    assert (full.title, full.retry_s, full.in_flight, full.shared_address) == (QUEUE_FULL, 4.0, 3, True)
    bad = refusal_of(raised(ValidationFailed("width", "must be a multiple of 8")), door)
    assert bad.retry_s is None and bad.message == "width: must be a multiple of 8"
    plain = refusal_of(gr.Error("something else", title="Odd"), DoorView())
    assert (plain.title, plain.message, plain.retry_s) == ("Odd", "something else", None)


def test_in_one_process_a_cpu_event_cannot_follow_a_function_that_is_no_gpu_event() -> None:
    from splitspace.shared.app.services import services

    async def follow() -> None:
        async for _ in services().follow(lambda text: text, ["x"], None):
            pass

    with pytest.raises(ValueError, match="no @splitspace.gpu event"):
        asyncio.run(follow())
