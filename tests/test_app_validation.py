"""The CPU tier's checks of a developer's GPU call (``cpu_frontend/api/validation.py``), in-process,
on real Gradio components: each rule with a call it lets through and one it refuses."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from PIL import Image

import splitspace
from splitspace.cpu_frontend.api.validation import is_valid_call, validate_call
from splitspace.shared.app.loader import GpuEndpoint, gpu_endpoints
from splitspace.shared.contract.errors import ValidationFailed

LIMIT = 1000


def endpoint(*makers: Callable[[], Any], validator: Callable[..., Any] | None = None) -> GpuEndpoint:
    """The one GPU event of a Blocks whose inputs are made by ``makers`` (inside the Blocks)."""
    return endpoint_and_blocks(*makers, validator=validator)[0]


def endpoint_and_blocks(
    *makers: Callable[[], Any], validator: Callable[..., Any] | None = None, **event: Any
) -> tuple[GpuEndpoint, gr.Blocks]:
    @splitspace.gpu
    def fn(*args: Any, **kwargs: Any) -> str:
        return "ok"

    with gr.Blocks() as demo:
        inputs = [make() for make in makers]
        out = gr.Textbox()
        if "inputs_kwargs" in event:
            event["inputs_kwargs"] = dict(zip(event["inputs_kwargs"], inputs, strict=True))
            inputs = []
        gr.Button().click(fn, inputs, out, api_name="fn", validator=validator, **event)
    (found,) = gpu_endpoints(demo)
    return found, demo


def rewire_as_the_frontend_does(ep: GpuEndpoint) -> None:
    """What the frontend does to the event to forward its calls (cpu_frontend/ui/app_events.py)."""
    block_fn = ep.block_fn
    block_fn.preprocess = block_fn.postprocess = block_fn.batch = block_fn.inputs_as_dict = False
    block_fn.input_keyword_names = []


def refused(ep: GpuEndpoint, *payloads: Any, max_file_bytes: int = LIMIT) -> str:
    with pytest.raises(ValidationFailed) as caught:
        validate_call(ep, list(payloads), max_file_bytes)
    return caught.value.message


def passes(ep: GpuEndpoint, *payloads: Any, max_file_bytes: int = LIMIT) -> None:
    validate_call(ep, list(payloads), max_file_bytes)


def file_data(path: Path, *, mime: str | None = None, orig_name: str | None = None) -> dict[str, Any]:
    return {
        "path": str(path),
        "orig_name": orig_name or path.name,
        "mime_type": mime,
        "size": path.stat().st_size if path.exists() else 0,
        "meta": {"_type": "gradio.FileData"},
    }


def a_file(tmp_path: Path, name: str, size: int = 10) -> Path:
    path = tmp_path / name
    path.write_bytes(b"x" * size)
    return path


# -- the call's shape and the inputs' names ---------------------------------------------------------
def test_the_number_of_inputs():
    ep = endpoint(lambda: gr.Textbox(label="Text"), lambda: gr.Checkbox(label="Loud"))
    passes(ep, "hi", True)
    assert refused(ep, "hi") == "inputs: expected 2 values, got 1"
    assert refused(ep, "hi", True, 3) == "inputs: expected 2 values, got 3"


def test_an_unlabeled_input_is_named_by_its_type_and_position():
    ep = endpoint(lambda: gr.Textbox(label="Text"), lambda: gr.Slider(0, 1))
    assert refused(ep, "hi", 2) == "Slider (input 2): must be at most 1"


def test_an_empty_input_passes_as_in_gradio():
    ep = endpoint(
        lambda: gr.Textbox(label="Text", max_length=3),
        lambda: gr.Number(label="N", minimum=1),
        lambda: gr.Image(label="Picture"),
        lambda: gr.Dropdown(["a"], label="D"),
    )
    passes(ep, None, None, None, None)


# -- numbers ----------------------------------------------------------------------------------------
def test_slider_range_and_its_declared_step():
    ep = endpoint(lambda: gr.Slider(1, 5, step=1, value=2, label="Times"))
    passes(ep, 1)
    passes(ep, 5.0)
    assert refused(ep, 6) == "Times: must be at most 5"
    assert refused(ep, 0) == "Times: must be at least 1"
    assert refused(ep, 2.5) == "Times: must be in steps of 1 from 1"


def test_a_slider_without_a_declared_step_takes_any_value_in_range():
    passes(endpoint(lambda: gr.Slider(0, 1, label="Strength")), 0.123456)


@pytest.mark.parametrize("bad", [True, "3", math.nan, math.inf, -math.inf, [3]])
def test_numbers_must_be_finite_numbers(bad):
    ep = endpoint(lambda: gr.Number(label="Seed"))
    passes(ep, 12345678901234)
    assert refused(ep, bad) in ("Seed: must be a number", "Seed: must be a finite number")


def test_number_range_precision_and_step():
    whole = endpoint(lambda: gr.Number(label="Steps", precision=0, minimum=1, maximum=50))
    passes(whole, 3)
    passes(whole, 3.0)
    assert refused(whole, 3.5) == "Steps: must be a whole number"
    assert refused(whole, 51) == "Steps: must be at most 50"
    cents = endpoint(lambda: gr.Number(label="Price", precision=2))
    passes(cents, 1.25)
    assert refused(cents, 1.255) == "Price: must have at most 2 decimals"
    halves = endpoint(lambda: gr.Number(label="Scale", minimum=0, step=0.5))
    passes(halves, 1.5)
    assert refused(halves, 1.2) == "Scale: must be in steps of 0.5"


# -- text, checkbox, JSON ---------------------------------------------------------------------------
def test_textbox_max_length_and_type():
    ep = endpoint(lambda: gr.Textbox(label="Text", max_length=200))
    passes(ep, "a" * 200)
    assert refused(ep, "a" * 201) == "Text: at most 200 characters"
    assert refused(ep, 5) == "Text: must be text"
    passes(endpoint(lambda: gr.TextArea(label="Notes")), "x" * 5000)  # no max_length: any length


def test_checkbox_takes_a_bool():
    ep = endpoint(lambda: gr.Checkbox(label="Loud"))
    passes(ep, False)
    assert refused(ep, "true") == "Loud: must be true or false"
    assert refused(ep, 1) == "Loud: must be true or false"


def test_json_must_be_json():
    ep = endpoint(lambda: gr.JSON(label="Options"))
    passes(ep, {"a": [1, 2.5, None, "x"]})
    assert refused(ep, {"a": math.nan}) == "Options: must be JSON"
    assert refused(ep, {"a": object()}) == "Options: must be JSON"


# -- choices ----------------------------------------------------------------------------------------
def test_dropdown_choices():
    ep = endpoint(lambda: gr.Dropdown(["red", ("Blue", "blue")], label="Colour"))
    passes(ep, "blue")
    assert refused(ep, "Blue") == "Colour: 'Blue' is not one of the choices ('red', 'blue')"
    assert refused(ep, ["red"]) == "Colour: must be one choice"
    numbers = endpoint(lambda: gr.Dropdown([1, 2], label="Size"))
    passes(numbers, 2)
    assert refused(numbers, True) == "Size: True is not a choice"  # True == 1, but not a choice


def test_dropdown_multiselect_and_max_choices():
    ep = endpoint(lambda: gr.Dropdown(["a", "b", "c"], multiselect=True, max_choices=2, label="Tags"))
    passes(ep, ["a", "c"])
    passes(ep, [])
    assert refused(ep, "a") == "Tags: must be a list of choices"
    assert refused(ep, ["a", "z"]) == "Tags: 'z' is not one of the choices ('a', 'b', 'c')"
    assert refused(ep, ["a", "b", "c"]) == "Tags: at most 2 choices"


def test_dropdown_with_custom_values():
    ep = endpoint(lambda: gr.Dropdown(["a"], allow_custom_value=True, label="Style"))
    passes(ep, "anything else")
    assert refused(ep, {"not": "a value"}) == "Style: {'not': 'a value'} is not a choice"


def test_radio_choices():
    ep = endpoint(lambda: gr.Radio(["fast", "good"], label="Mode"))
    passes(ep, "good")
    assert refused(ep, "cheap") == "Mode: 'cheap' is not one of the choices ('fast', 'good')"


def test_checkbox_group_choices():
    ep = endpoint(lambda: gr.CheckboxGroup(["x", "y"], label="Axes"))
    passes(ep, ["x", "y"])
    assert refused(ep, ["z"]) == "Axes: 'z' is not one of the choices ('x', 'y')"
    assert refused(ep, "x") == "Axes: must be a list of choices"


# -- files ------------------------------------------------------------------------------------------
def test_file_types_by_extension(tmp_path):
    ep = endpoint(lambda: gr.File(label="Notes", file_types=[".txt", ".md"]))
    passes(ep, file_data(a_file(tmp_path, "a.TXT")))
    assert refused(ep, file_data(a_file(tmp_path, "a.exe"))) == (
        "Notes: a.exe is not one of the accepted file types (.txt, .md)"
    )
    # the name the caller gave must be accepted too, not only the cached path's
    assert "evil.exe" in refused(ep, file_data(a_file(tmp_path, "b.txt"), orig_name="evil.exe"))
    assert refused(ep, "a.txt") == "Notes: must be a file"


def test_file_types_by_kind_and_mime(tmp_path):
    ep = endpoint(lambda: gr.File(label="Picture", file_types=["image"]))
    passes(ep, file_data(a_file(tmp_path, "x.png"), mime="image/png"))
    assert "not one of the accepted file types (image)" in refused(ep, file_data(a_file(tmp_path, "x.txt")))
    # a declared type that disagrees with the name is refused
    assert "not one of" in refused(ep, file_data(a_file(tmp_path, "y.png"), mime="application/x-msdownload"))
    anything = endpoint(lambda: gr.File(label="Any"))
    passes(anything, file_data(a_file(tmp_path, "z.bin")))


def test_upload_button_file_types(tmp_path):
    ep = endpoint(lambda: gr.UploadButton("Upload", file_types=[".csv"]))
    passes(ep, file_data(a_file(tmp_path, "t.csv")))
    assert "t.json is not one of" in refused(ep, file_data(a_file(tmp_path, "t.json")))


def test_files_in_a_list(tmp_path):
    ep = endpoint(lambda: gr.File(label="Docs", file_count="multiple", file_types=[".pdf"]))
    passes(ep, [file_data(a_file(tmp_path, "1.pdf")), file_data(a_file(tmp_path, "2.pdf"))])
    assert refused(ep, file_data(a_file(tmp_path, "3.pdf"))) == "Docs: must be a list of files"
    assert "4.doc is not one of" in refused(
        ep, [file_data(a_file(tmp_path, "1.pdf")), file_data(a_file(tmp_path, "4.doc"))]
    )


@pytest.mark.parametrize(
    "component,good,bad",
    [
        (lambda: gr.Image(label="Photo"), "p.png", "p.txt"),
        (lambda: gr.Audio(label="Voice"), "v.wav", "v.png"),
        (lambda: gr.Video(label="Clip"), "c.mp4", "c.wav"),
    ],
)
def test_image_audio_and_video_take_their_kind(tmp_path, component, good, bad):
    ep = endpoint(component)
    passes(ep, file_data(a_file(tmp_path, good)))
    assert f"{bad} is not one of the accepted file types" in refused(ep, file_data(a_file(tmp_path, bad)))


def test_gallery_takes_images_and_videos(tmp_path):
    ep = endpoint(lambda: gr.Gallery(label="Set"))
    passes(ep, [{"image": file_data(a_file(tmp_path, "g.jpg")), "caption": None}])
    assert "g.zip is not one of" in refused(ep, [{"image": file_data(a_file(tmp_path, "g.zip")), "caption": None}])
    assert refused(ep, [{"caption": "no file"}]) == "Set: must be a list of files"


def test_file_size_limit(tmp_path):
    ep = endpoint(lambda: gr.File(label="Upload"))
    passes(ep, file_data(a_file(tmp_path, "ok.bin", size=100)), max_file_bytes=100)
    assert refused(ep, file_data(a_file(tmp_path, "big.bin", size=101)), max_file_bytes=100) == (
        "Upload: big.bin is 101 bytes, over the limit of 100 bytes"
    )
    # the size is the file's, not the one the caller declared
    small_claim = {**file_data(a_file(tmp_path, "liar.bin", size=500)), "size": 1}
    assert "500 bytes" in refused(ep, small_claim, max_file_bytes=100)


def test_a_file_that_is_not_there(tmp_path):
    ep = endpoint(lambda: gr.File(label="Upload"))
    assert refused(ep, file_data(tmp_path / "gone.bin")) == "Upload: gone.bin was not uploaded"


# -- the event's validator --------------------------------------------------------------------------
def test_the_events_validator_names_the_input_it_refuses():
    def validator(text: str, times: float) -> list[dict[str, Any]]:
        return [gr.validate("!" not in text, "no shouting in the input"), gr.validate(True, "")]

    ep = endpoint(lambda: gr.Textbox(label="Text"), lambda: gr.Slider(1, 5, label="Times"), validator=validator)
    passes(ep, "hello", 2)
    assert refused(ep, "hello!", 2) == "Text: no shouting in the input"


def test_the_validator_gets_preprocessed_values(tmp_path):
    seen: list[Any] = []

    def validator(picture: Image.Image, steps: int) -> list[dict[str, Any]]:
        seen.append((type(picture), picture.size, steps, type(steps)))
        return [gr.validate(picture.size[0] <= 8, "at most 8 pixels wide"), gr.validate(True, "")]

    ep = endpoint(
        lambda: gr.Image(type="pil", label="Picture"),
        lambda: gr.Number(precision=0, label="Steps"),
        validator=validator,
    )
    small, wide = tmp_path / "small.png", tmp_path / "wide.png"
    Image.new("RGB", (4, 4)).save(small)
    Image.new("RGB", (16, 4)).save(wide)
    passes(ep, file_data(small), 3.0)
    assert seen[0][0] is Image.Image or issubclass(seen[0][0], Image.Image)
    assert seen[0][1:] == ((4, 4), 3, int)
    assert refused(ep, file_data(wide), 3) == "Picture: at most 8 pixels wide"


def test_a_validator_that_raises_refuses_the_call():
    def validator(text: str) -> None:
        if text == "forbidden":
            raise gr.Error("that word is not allowed")

    ep = endpoint(lambda: gr.Textbox(label="Text"), validator=validator)
    passes(ep, "fine")
    assert refused(ep, "forbidden") == "fn: that word is not allowed"


def test_an_async_validator_runs_too():
    async def validator(text: str) -> dict[str, Any]:
        return gr.validate(len(text) > 1, "too short")

    ep = endpoint(lambda: gr.Textbox(label="Text"), validator=validator)
    passes(ep, "ok")
    assert refused(ep, "x") == "Text: too short"


def test_an_interfaces_validator():
    @splitspace.gpu
    def shout(text: str, times: float) -> str:
        return text

    demo = gr.Interface(
        shout,
        [gr.Textbox(label="Text"), gr.Slider(1, 5, label="Times")],
        gr.Textbox(),
        api_name="shout",
        validator=lambda text, times: [gr.validate(bool(text), "say something"), None],
    )
    (ep,) = gpu_endpoints(demo)
    passes(ep, "hi", 2)
    assert refused(ep, "", 2) == "Text: say something"
    assert refused(ep, "hi", 9) == "Times: must be at most 5"  # the components' checks come first


def test_the_validator_is_called_as_the_app_defined_the_event_after_the_frontend_rewires_it(tmp_path):
    seen: list[Any] = []

    def by_dict(values: dict[Any, Any]) -> list[dict[str, Any]]:
        seen.append(sorted(type(v).__name__ for v in values.values()))
        return [gr.validate(True, ""), gr.validate(True, "")]

    @splitspace.gpu
    def fn(values: dict[Any, Any]) -> str:
        return "ok"

    with gr.Blocks() as demo:  # a set of inputs: the function gets them as a dict
        picture, text = gr.Image(type="pil", label="Picture"), gr.Textbox(label="Text")
        gr.Button().click(fn, {picture, text}, gr.Textbox(), api_name="fn", validator=by_dict)
    (ep,) = gpu_endpoints(demo)
    rewire_as_the_frontend_does(ep)
    Image.new("RGB", (2, 2)).save(tmp_path / "p.png")
    picture_data = file_data(tmp_path / "p.png")
    passes(ep, *[picture_data if component is picture else "hi" for component in ep.inputs])
    assert seen == [["Image", "str"]]  # a dict of preprocessed values (a PIL image), as before the rewiring

    def by_name(text: str, *, times: float) -> list[dict[str, Any]]:
        return [gr.validate(True, ""), gr.validate(times < 3, "three or more is too many")]

    ep, _ = endpoint_and_blocks(
        lambda: gr.Textbox(label="Text"),
        lambda: gr.Slider(1, 5, label="Times"),
        validator=by_name,
        inputs_kwargs=["text", "times"],
    )
    rewire_as_the_frontend_does(ep)
    passes(ep, "hi", 2)
    assert refused(ep, "hi", 4) == "Times: three or more is too many"


def test_gradio_runs_the_frontends_validator_and_marks_the_refused_input():
    """Through Gradio's own code (what ``Queue.push`` runs before queueing a call): the
    rewired event's validator is :func:`gradio_validator`, which Gradio calls on the raw
    payloads; it answers per input, so the page marks the one refused."""
    import asyncio

    from gradio.queueing import create_validator_fn, process_validation_response

    from splitspace.cpu_frontend.api.validation import gradio_validator

    def app_validator(text: str, times: float) -> list[dict[str, Any]]:
        return [gr.validate(text != "boo", "not that word"), gr.validate(True, "")]

    ep, demo = endpoint_and_blocks(
        lambda: gr.Textbox(label="Text"), lambda: gr.Slider(1, 5, step=1, label="Times"), validator=app_validator
    )
    rewire_as_the_frontend_does(ep)
    ep.block_fn.validator = gradio_validator(ep, LIMIT)

    def verdicts(*payloads: Any) -> tuple[bool, list[str]]:
        response = asyncio.run(demo.process_api(create_validator_fn(ep.block_fn), list(payloads)))
        valid, data = process_validation_response(response["data"], ep.block_fn)
        return valid, [d["message"] for d in data]

    assert verdicts("hi", 2) == (True, ["", ""])
    assert verdicts("hi", 9) == (False, ["", "Times: must be at most 5"])
    assert verdicts("boo", 2) == (False, ["Text: not that word", ""])


# -- which REST calls the door's middleware holds (is_valid_call) ---------------------------------
def test_the_door_holds_only_calls_these_checks_pass_by_position_or_by_name():
    from splitspace.cpu_frontend.ui.app_events import forward_gpu_events

    ep = endpoint(lambda: gr.Slider(1, 5, step=1, label="Times"), lambda: gr.Textbox(label="Text"))

    async def follow(*_: Any) -> Any:
        yield []

    forward_gpu_events([ep], follow)  # the handler's parameters name /call/v2's values
    names = [p for p in inspect.signature(ep.block_fn.fn).parameters if p not in ("request", "progress")]
    assert is_valid_call(ep, [3, "hi"], LIMIT)
    assert not is_valid_call(ep, [6, "hi"], LIMIT) and not is_valid_call(ep, [3], LIMIT)
    assert not is_valid_call(ep, "3, hi", LIMIT) and not is_valid_call(ep, None, LIMIT)
    assert is_valid_call(ep, dict(zip(names, [3, "hi"], strict=True)), LIMIT)
    assert not is_valid_call(ep, dict(zip(names, [6, "hi"], strict=True)), LIMIT)
    assert not is_valid_call(ep, {names[0]: 3}, LIMIT), "a value missing, with no default"
    assert not is_valid_call(ep, {**dict(zip(names, [3, "hi"], strict=True)), "other": 1}, LIMIT)
