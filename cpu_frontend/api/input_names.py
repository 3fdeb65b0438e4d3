"""An app's GPU event as the HTTP APIs outside Gradio name it: its inputs by name, with defaults.

Why it exists: durable jobs (``jobs/targets.py``) take an event's inputs by name, and
OpenAI's images API (``api/openai_images.py``) maps its body onto the built-in's
``generate`` by name and names a refused input by it; both name them as Gradio's
``/call/v2`` does, by the function's parameters, so that one event has one set of names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splitspace.shared.app.loader import GpuEndpoint


@dataclass(frozen=True)
class Function:
    """One GPU event as the APIs see it: its API name, its inputs' names and defaults."""

    name: str
    inputs: tuple[str, ...]
    defaults: Mapping[str, Any]


def describe(endpoint: GpuEndpoint) -> Function:
    """A :class:`Function` of a ``shared.app.loader.GpuEndpoint``: its inputs are named as
    the function's parameters (as Gradio's ``/call/v2`` names them), with the function's
    defaults, else the component's value."""
    components = endpoint.inputs
    try:
        params = list(inspect.signature(endpoint.record.fn).parameters.values())[: len(components)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params] + [f"input_{i}" for i in range(len(params), len(components))]
    defaults: dict[str, Any] = {}
    for i, (name, component) in enumerate(zip(names, components, strict=True)):
        if i < len(params) and params[i].default is not inspect.Parameter.empty:
            defaults[name] = params[i].default
        elif getattr(component, "value", None) is not None:
            defaults[name] = component.value
    return Function(endpoint.api_name, tuple(names), defaults)
