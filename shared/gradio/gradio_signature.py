"""The request's fields as a Gradio handler's parameters, written once.

Gradio learns an endpoint's parameters (their names, defaults and types, as the
"View API" page, ``gradio_client`` and MCP show them) from the handler's
signature. The frontend's ``/generate`` takes the same fields as
:class:`~shared.contract.schema.GenerateRequest`; instead of a copy of
the field list in its signature, :func:`request_handler` gives a handler of
the form ``handler(values: dict, request)`` the signature Gradio reads,
derived from the dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import AsyncIterator, Callable
from typing import Any

import gradio as gr

from splitspace.shared.contract.schema import REQUEST_FIELDS, GenerateRequest

Handler = Callable[[dict[str, Any], "gr.Request | None"], AsyncIterator[Any]]


def request_parameters() -> list[inspect.Parameter]:
    """One parameter per request field, in order, with the dataclass's defaults and types."""
    hints = typing.get_type_hints(GenerateRequest)
    return [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=hints[f.name],
            default=f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty,
        )
        for f in dataclasses.fields(GenerateRequest)
    ]


def request_handler(
    handler: Handler, name: str, doc: str, returns: object = AsyncIterator[Any]
) -> Callable[..., AsyncIterator[Any]]:
    """A Gradio handler with the request's fields as parameters (then ``request: gr.Request``)
    that calls ``handler({field: value}, request)`` and yields what it yields."""

    async def endpoint(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = {field: bound.arguments[field] for field in REQUEST_FIELDS}
        async for out in handler(values, bound.arguments["request"]):
            yield out

    signature = inspect.Signature(
        [
            *request_parameters(),
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request, default=None),
        ],
        return_annotation=returns,
    )
    endpoint.__signature__ = signature  # type: ignore[attr-defined]
    # what Gradio's type checks read (``gr.api`` wants every parameter and the result typed)
    endpoint.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()} | {"return": returns}
    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__doc__ = doc
    return endpoint
