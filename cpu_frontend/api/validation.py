"""Check a call of a developer's GPU function on the CPU tier, from what its components declare.

A call that the GPU tier would refuse, or that would waste its time, is refused here first,
with a message naming the input by its label ("Times: must be at most 5"). The values are
Gradio's raw API payloads, as its ``/call`` API holds them after its own file handling and
before ``preprocess``: a file is a ``FileData`` dict whose path is in this tier's cache.

One check per component family (:data:`CHECKS`, looked up along the component's class
hierarchy, so ``gr.TextArea`` is checked as a ``gr.Textbox``); a component of no family
(``gr.State``, a custom component) is left to its own ``preprocess`` on the GPU tier.
``None`` is an empty input, as in Gradio, and passes every check.

The event's own ``validator=`` runs last (:func:`validator_problem`), as Gradio runs it: on
the inputs preprocessed by their components, called as the event's function is. Gradio runs
it itself only in ``Queue.push`` (``queueing.py``: ``/queue/join``, ``/call/<api>``), not on
the direct ``/run/<api>`` route (open for ``queue=False`` events, or all events with
``api_open``), and from the event as it is then: the frontend's event, rewired to forward raw
payloads (``preprocess=False``, inputs positional), would hand it ``FileData`` dicts, not
the images it was written for. So it runs here, for every route, from the event as the app
defined it (``GpuEndpoint`` keeps that); :func:`gradio_validator` is what the frontend's
event should give Gradio instead, so that the page still marks the input refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import math
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio_client import utils as client_utils

from splitspace.shared.contract.errors import ValidationFailed

if TYPE_CHECKING:
    from gradio.components import Component

    from splitspace.shared.app.loader import GpuEndpoint

Check = Callable[[Any, Any, int], "str | None"]
"""``(component, payload, max_file_bytes)`` -> what is wrong with the payload, or None."""


class InputRefused(ValidationFailed):
    """A call refused for one of its inputs, named by its label; ``position`` (from 1; None:
    the call as a whole) says which, for an edge that names inputs otherwise (OpenAI's
    images API names the body's parameter)."""

    def __init__(self, field: str, message: str, position: int | None) -> None:
        super().__init__(field, message)
        self.position = position


def validate_call(endpoint: GpuEndpoint, payloads: list[Any], max_file_bytes: int) -> None:
    """Raise :class:`InputRefused` naming the first input that its component refuses,
    or that the event's ``validator`` marks invalid."""
    problem = first_problem(endpoint, payloads, max_file_bytes)
    if problem is not None:
        raise InputRefused(problem.field, problem.message, problem.position)


def is_valid_call(endpoint: GpuEndpoint, values: object, max_file_bytes: int) -> bool:
    """Whether a REST call's values (a list in input order, or ``/call/v2``'s values by the
    handler's parameter names) make a call these checks pass: the door's middleware holds
    only those before Gradio, and passes anything else on, where Gradio's validator refuses
    it naming the input. A file not yet in this tier's cache (Gradio moves uploads there
    after the door) is no valid call here: it goes on, and joins the door in the handler."""
    if isinstance(values, dict):
        values = _in_order(endpoint, values)
    if not isinstance(values, list):
        return False
    return first_problem(endpoint, values, max_file_bytes) is None


def _in_order(endpoint: GpuEndpoint, named: dict[str, Any]) -> list[Any] | None:
    """``/call/v2``'s named values in input order (defaults filled in), or None: a name that
    is not a parameter, or a parameter with no value and no default."""
    fn = endpoint.block_fn.fn
    if fn is None:
        return None
    try:
        parameters = list(inspect.signature(fn).parameters.values())[: len(endpoint.inputs)]
    except (TypeError, ValueError):
        return None
    if set(named) - {p.name for p in parameters}:
        return None
    values = [named.get(p.name, p.default) for p in parameters]
    return None if any(v is inspect.Parameter.empty for v in values) else values


@dataclass(frozen=True)
class Problem:
    """What is wrong with a call: the input it names (``position``, from 1; None: the call)."""

    field: str
    message: str
    position: int | None = None


def first_problem(endpoint: GpuEndpoint, payloads: list[Any], max_file_bytes: int) -> Problem | None:
    inputs = endpoint.inputs
    if len(payloads) != len(inputs):
        return Problem("inputs", f"expected {len(inputs)} values, got {len(payloads)}")
    for position, (component, payload) in enumerate(zip(inputs, payloads, strict=True), start=1):
        check = check_for(component)
        problem = None if check is None or payload is None else check(component, payload, max_file_bytes)
        if problem:
            return Problem(input_name(component, position), problem, position)
    return validator_problem(endpoint, payloads)


def input_name(component: Any, position: int) -> str:
    """The input's label, or its component type and position ("Slider (input 2)")."""
    label = getattr(component, "label", None)
    return str(label) if label else f"{type(component).__name__} (input {position})"


def check_for(component: Any) -> Check | None:
    if getattr(component, "stateful", False):
        return None  # gr.State: a value kept on this tier, not sent by the caller
    return next((CHECKS[cls] for cls in type(component).__mro__ if cls in CHECKS), None)


def takes_files(component: Any) -> bool:
    """Whether the component's payload is a file, or files (what :func:`_files` checks)."""
    return check_for(component) is _files


# -- numbers ---------------------------------------------------------------------------------------
def _number(component: Any, value: Any, _: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number"
    if not math.isfinite(value):
        return "must be a finite number"
    low, high = component.minimum, component.maximum
    if low is not None and value < low:
        return f"must be at least {_show(low)}"
    if high is not None and value > high:
        return f"must be at most {_show(high)}"
    precision = component.precision
    if precision is not None and not _close(value, round(value, precision)):
        return "must be a whole number" if precision == 0 else f"must have at most {precision} decimals"
    step = component.constructor_args.get("step")  # only a step the developer declared
    if step:
        base = low if low is not None else 0
        if not _close((value - base) / step, round((value - base) / step)):
            return f"must be in steps of {_show(step)}" + (f" from {_show(base)}" if base else "")
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


# -- text ------------------------------------------------------------------------------------------
def _text(component: Any, value: Any, _: int) -> str | None:
    if not isinstance(value, str):
        return "must be text"
    limit = getattr(component, "max_length", None)
    return f"at most {limit} characters" if limit is not None and len(value) > limit else None


def _checkbox(component: Any, value: Any, _: int) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _json(component: Any, value: Any, _: int) -> str | None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return "must be JSON"
    return None


# -- choices ---------------------------------------------------------------------------------------
def _choices(component: Any, value: Any, _: int) -> str | None:
    """Dropdown (one, or a list with ``multiselect``), Radio (one), CheckboxGroup (a list)."""
    many = isinstance(component, gr.CheckboxGroup) or bool(getattr(component, "multiselect", False))
    if many != isinstance(value, list):
        return "must be a list of choices" if many else "must be one choice"
    items = value if many else [value]
    most = getattr(component, "max_choices", None)
    if many and most is not None and len(items) > most:
        return f"at most {most} choices"
    allowed = [choice for _, choice in component.choices]
    custom = bool(getattr(component, "allow_custom_value", False))
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            return f"{item!r} is not a choice"
        if not custom and not any(item == c and type(item) is type(c) or _same_number(item, c) for c in allowed):
            shown = ", ".join(repr(c) for c in allowed[:10]) + (", ..." if len(allowed) > 10 else "")
            return f"{item!r} is not one of the choices ({shown})"
    return None


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return type(a) in numbers and type(b) in numbers and a == b


# -- files -----------------------------------------------------------------------------------------
def _files(component: Any, value: Any, max_file_bytes: int) -> str | None:
    """File, UploadButton (their ``file_types``; a list with ``file_count`` multiple or
    directory), Image, Audio, Video (their kind), Gallery (images and videos, in a list)."""
    kinds, many = _file_kinds(component)
    if many:
        if not isinstance(value, list):
            return "must be a list of files"
        files = [f for item in value for f in _file_objects(item)]
        if len(files) < len(value):
            return "must be a list of files"
    else:
        if not client_utils.is_file_obj(value):
            return "must be a file"
        files = [value]
    for file in files:
        problem = _file_problem(file, kinds, max_file_bytes)
        if problem:
            return problem
    return None


def _file_kinds(component: Any) -> tuple[list[str] | None, bool]:
    """The file types a component takes (None: any) and whether it takes a list."""
    for kind, cls in (("image", gr.Image), ("audio", gr.Audio), ("video", gr.Video)):
        if isinstance(component, cls):
            return [kind], False
    if isinstance(component, gr.Gallery):
        return component.file_types or ["image", "video"], True
    return component.file_types, getattr(component, "file_count", "single") != "single"


def _file_objects(value: Any) -> list[dict[str, Any]]:
    """The files in one item: a FileData, or a Gallery item (``{"image": FileData, ...}``)."""
    if client_utils.is_file_obj(value):
        return [value]
    if isinstance(value, dict):
        return [v for v in value.values() if client_utils.is_file_obj(v)]
    return []


def _file_problem(file: dict[str, Any], kinds: list[str] | None, max_file_bytes: int) -> str | None:
    path = Path(file["path"])
    names = [name for name in (file.get("orig_name"), path.name) if name]
    declared = file.get("mime_type") if isinstance(file.get("mime_type"), str) else None
    if kinds is not None and not all(_type_allowed(str(name), declared, kinds) for name in names):
        return f"{names[0]} is not one of the accepted file types ({', '.join(kinds)})"
    try:
        size = path.stat().st_size
    except OSError:
        return f"{names[0]} was not uploaded"
    if size > max_file_bytes:
        return f"{names[0]} is {size} bytes, over the limit of {max_file_bytes} bytes"
    return None


def _type_allowed(name: str, declared_mime: str | None, kinds: list[str]) -> bool:
    """As Gradio's ``is_valid_file``: ``"file"`` takes any file, ``".ext"`` its extension, a
    kind (``"image"``) a type of that kind, from the name's extension and the declared
    type, which must agree."""
    lowered = name.lower()
    mimes = {m for m in (mimetypes.guess_type(name)[0], declared_mime) if m}
    for kind in kinds:
        if kind == "file":
            return True
        if kind.startswith("."):
            if len(lowered) > len(kind) and lowered.endswith(kind.lower()):
                return True
        elif mimes and all(m.startswith(f"{kind}/") for m in mimes):
            return True
    return False


CHECKS: dict[type, Check] = {
    gr.Number: _number,
    gr.Slider: _number,
    gr.Textbox: _text,
    gr.Code: _text,
    gr.Checkbox: _checkbox,
    gr.JSON: _json,
    gr.Dropdown: _choices,
    gr.Radio: _choices,
    gr.CheckboxGroup: _choices,
    gr.File: _files,
    gr.UploadButton: _files,
    gr.Image: _files,
    gr.Audio: _files,
    gr.Video: _files,
    gr.Gallery: _files,
}


# -- the event's validator -------------------------------------------------------------------------
def validator_problem(endpoint: GpuEndpoint, payloads: list[Any]) -> Problem | None:
    """Run the event's ``validator=`` as Gradio does: on the inputs preprocessed by their
    components (when the event preprocesses), called as the event's function is (keyword
    inputs by name, ``inputs`` given as a dict), as the app defined the event
    (:class:`GpuEndpoint` keeps that). An input it marks ``gr.validate(False, message)`` is
    refused with its message; a validator that raises refuses the call with the exception's."""
    validator = endpoint.validator
    if validator is None:
        return None
    inputs = endpoint.inputs
    values = [
        _preprocessed(component, payload, position) if endpoint.preprocess else payload
        for position, (component, payload) in enumerate(zip(inputs, payloads, strict=True), start=1)
    ]
    if any(isinstance(value, Problem) for value in values):
        return next(value for value in values if isinstance(value, Problem))
    if endpoint.record.batch:
        values = [[value] for value in values]
    args: list[Any] = [dict(zip(inputs, values, strict=True))] if endpoint.inputs_as_dict else values
    kwargs: dict[str, Any] = {}
    if endpoint.keyword_names and not endpoint.inputs_as_dict:
        k = len(endpoint.keyword_names)
        args, kwargs = values[:-k], dict(zip(endpoint.keyword_names, values[-k:], strict=True))
    try:
        result = _call(validator, args, kwargs)
    except Exception as exc:
        return Problem(endpoint.api_name, str(getattr(exc, "message", None) or exc))
    for position, verdict in _verdicts(result, len(inputs)):
        if verdict.get("is_valid") is False:
            field = endpoint.api_name if position is None else input_name(inputs[position - 1], position)
            return Problem(field, str(verdict.get("message") or "is not valid"), position)
    return None


def gradio_validator(endpoint: GpuEndpoint, max_file_bytes: int) -> Callable[..., Any]:
    """The checks above as a Gradio ``validator=`` for the frontend's own event, once it is
    rewired to forward its calls (``preprocess=False``, every input positional): Gradio runs
    it before queueing a call (``Queue.push``) and the page marks the input it refuses, as
    plain Gradio does for a validator. Gradio would otherwise run the app's validator there
    on the raw payloads (``FileData`` dicts, not images). The handler runs :func:`validate_call`
    only for a call Gradio did not queue (``/run`` skips its validator), so each call is
    checked once (``ui/app_events.py``)."""
    count = len(endpoint.inputs)

    def validate(*payloads: Any) -> Any:
        problem = first_problem(endpoint, list(payloads), max_file_bytes)
        if problem is not None and problem.position is None:
            raise gr.Error(f"{problem.field}: {problem.message}")
        refused = None if problem is None else problem.position
        said = "" if problem is None else f"{problem.field}: {problem.message}"
        verdicts = [gr.validate(i != refused, said if i == refused else "") for i in range(1, count + 1)]
        return verdicts[0] if count == 1 else verdicts  # Gradio reads one output as the value itself

    return validate


def _preprocessed(component: Component, payload: Any, position: int) -> Any:
    """The value the app's function would get (a Problem if the component cannot read it)."""
    if getattr(component, "stateful", False) or payload is None:
        return payload
    try:
        model = getattr(component, "data_model", None)
        value = model.model_validate(payload, context={"validate_meta": True}) if model else payload
        return component.preprocess(value)
    except Exception as exc:
        return Problem(
            input_name(component, position), str(getattr(exc, "message", None) or exc) or type(exc).__name__, position
        )


def _call(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    result = fn(*args, **kwargs)
    if not inspect.isawaitable(result):
        return result

    async def wait() -> Any:
        return await result

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from a coroutine: its own loop
        return pool.submit(asyncio.run, wait()).result()


def _verdicts(result: Any, count: int) -> list[tuple[int | None, dict[str, Any]]]:
    """``(position, gr.validate(...))`` for each input the validator answered for: a list
    (tuple) of them, one per input, or one alone: for the only input, or for the whole call
    (position None). Anything else passes."""

    def verdict(item: Any) -> dict[str, Any] | None:
        if isinstance(item, list) and len(item) == 1:  # a batch event answers per call
            item = item[0]
        return item if isinstance(item, dict) and item.get("__type__") == "validate" else None

    if isinstance(result, list | tuple):
        return [(i, v) for i, item in enumerate(result[:count], start=1) if (v := verdict(item)) is not None]
    single = verdict(result)
    return [] if single is None else [(1 if count == 1 else None, single)]
