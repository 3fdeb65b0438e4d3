"""Load the developer's app (``APP``: ``file.py``, its ``demo``, or ``file.py:NAME``) and
find the events whose function is decorated with ``@splitspace.gpu``.

The app is imported as its own module, with its folder first on ``sys.path`` (as
``python app.py`` would run it), so its own modules import as they do there and, on
ZeroGPU, its functions pickle by their module's name. Importing it must load no weights:
the documented way to load a model on the GPU tier alone is at first use (see the
examples), so the frontend, which imports the same file, stays small.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitspace.shared.app.gpu_function import GpuFunction, gpu_function

if TYPE_CHECKING:
    import gradio as gr
    from gradio.block_function import BlockFunction

DEFAULT_NAME = "demo"


class AppError(Exception):
    """The APP argument names nothing that can be served (the message says what and why)."""


@dataclass(frozen=True)
class AppSpec:
    path: Path
    name: str = DEFAULT_NAME

    @classmethod
    def parse(cls, spec: str) -> AppSpec:
        """``file.py`` or ``file.py:NAME``; the file must exist."""
        file, _, name = spec.partition(":")
        path = Path(file).expanduser()
        if path.suffix != ".py":
            raise AppError(f"APP must be a Python file (file.py or file.py:NAME), not {spec!r}")
        if not path.is_file():
            raise AppError(f"no such file: {file}")
        if name and not name.isidentifier():
            raise AppError(f"{name!r} is not a Python name (APP is file.py or file.py:NAME)")
        return cls(path.resolve(), name or DEFAULT_NAME)

    def __str__(self) -> str:
        return f"{self.path}:{self.name}"


@dataclass(frozen=True)
class GpuEndpoint:
    """One event of the app whose function runs on the GPU tier."""

    api_name: str
    """The event's API name, without the leading slash; the hop calls it by this name."""
    record: GpuFunction
    block_fn: BlockFunction
    """Gradio's event: its input and output components (labels, limits, pre/postprocessing)."""
    validator: Callable[..., Any] | None = None
    """The event's ``validator=``, and below how the event calls its function, as the app
    defined them (:func:`gpu_endpoints` reads them): a tier may rewire ``block_fn`` afterwards
    (the frontend forwards the event's calls), and the validator must still be called as
    the app's own function is."""
    preprocess: bool = True
    inputs_as_dict: bool = False
    keyword_names: tuple[str, ...] = ()
    streams: bool = False
    """The event's function is a generator (sync or async, e.g. a ``gr.ChatInterface``'s) and
    not a batch function: each yield is streamed to the caller."""
    time_limit: float | None = None
    """Seconds a stream may run: the decorator's ``time_limit``, else the event's own."""

    @property
    def inputs(self) -> list[Any]:
        return list(self.block_fn.inputs)

    @property
    def outputs(self) -> list[Any]:
        return list(self.block_fn.outputs)


def load_app(spec: AppSpec | str) -> gr.Blocks:
    """Import the app's module and return its Blocks (a ``gr.Interface`` or
    ``gr.ChatInterface`` is one)."""
    import gradio as gr

    spec = AppSpec.parse(spec) if isinstance(spec, str) else spec
    folder, module_name = str(spec.path.parent), spec.path.stem
    if folder not in sys.path:
        sys.path.insert(0, folder)
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != spec.path:
        raise AppError(
            f"{spec.path.name}: a module named {module_name!r} is already imported from elsewhere; "
            "rename the app's file"
        )
    module = loaded or importlib.import_module(module_name)
    blocks = getattr(module, spec.name, None)
    if not isinstance(blocks, gr.Blocks):
        found = "nothing" if blocks is None else type(blocks).__name__
        raise AppError(
            f"{spec.path.name} has no Gradio Blocks named {spec.name!r} ({found} there); "
            f"name yours {DEFAULT_NAME!r} or pass {spec.path.name}:NAME"
        )
    return blocks


def gpu_endpoints(blocks: gr.Blocks) -> list[GpuEndpoint]:
    """The app's events whose function is decorated with ``@splitspace.gpu``, in the app's
    order. Each needs an API name (Gradio gives one unless ``api_visibility="private"`` or
    ``api_name=False``); two events may share a function but not a name."""
    found: list[GpuEndpoint] = []
    names: set[str] = set()
    for block_fn in blocks.fns.values():
        record = gpu_function(block_fn.fn)
        if record is None:
            continue
        api_name = str(block_fn.api_name or "").lstrip("/")
        if not api_name:
            raise AppError(
                f"the event of {record.name!r} has no API name; give it api_name=... "
                "(the GPU tier calls each function by its API name)"
            )
        if api_name in names:
            raise AppError(f"two GPU events are both named {api_name!r}")
        names.add(api_name)
        generator = inspect.isgeneratorfunction(block_fn.fn) or inspect.isasyncgenfunction(block_fn.fn)
        event_limit = getattr(block_fn, "time_limit", None)
        found.append(
            GpuEndpoint(
                api_name,
                record,
                block_fn,
                validator=getattr(block_fn, "validator", None),
                preprocess=bool(block_fn.preprocess),
                inputs_as_dict=bool(block_fn.inputs_as_dict),
                keyword_names=tuple(block_fn.input_keyword_names or ()),
                streams=generator and not record.batch,
                time_limit=record.time_limit
                or (
                    float(event_limit)
                    if isinstance(event_limit, int | float) and not isinstance(event_limit, bool) and event_limit > 0
                    else None
                ),
            )
        )
    return found
