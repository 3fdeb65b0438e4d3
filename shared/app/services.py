"""What the frontend offers an app's own (CPU) events, and the same in one process.

An app's page may want more than its GPU events' outputs: to follow a GPU call from a
CPU event (word its place in line, catch a refusal and explain it), to show the caller's
quota, to read which model the GPU tier serves. The frontend registers itself
(:func:`register`) before it imports the app; the app's events look it up at each call
(:func:`services`), so the same file runs in one process (``python app.py``), where
:class:`LocalServices` answers: the GPU function runs here, and there is no quota.

``follow`` is the one way a CPU event calls a GPU function: on the frontend it is the
GPU event's own path (validation, the caller's identity, the fair door, the hop), so a
page built on it gets nothing that the API does not.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from splitspace.shared.contract.hop import Status

if TYPE_CHECKING:
    import gradio as gr


@dataclass(frozen=True)
class DoorView:
    """The caller's requests at the frontend, as a refusal explains them."""

    in_flight: int = 0
    """The caller's requests in flight here (its address's, for a browser)."""
    shared_address: bool = False
    """They are counted by network address (a browser), not by API key."""
    seconds_per_job: float = 1.0
    """GPU seconds a job takes, as measured lately: about how long a full queue takes to make room."""


class AppServices(Protocol):
    """What an app's CPU events may ask of the tier that serves them."""

    @property
    def browser_secret(self) -> str: ...

    def follow(
        self, fn: Callable[..., Any], payloads: list[Any], request: gr.Request | None
    ) -> AsyncGenerator[Status | list[Any], None]:
        """A call of the ``@splitspace.gpu`` function ``fn`` with these API payloads (one
        per input component): its statuses while it waits, then its outputs as payloads
        (files in this tier's cache). Refusals and failures raise ``gr.Error``."""
        ...

    async def standing(self, request: gr.Request | None) -> dict[str, Any]:
        """The caller's quota standing (``/quota``); raises ``gr.Error`` when it cannot be read."""
        ...

    def gpu_health(self) -> dict[str, Any] | None:
        """The GPU tier's latest health document (its model, the model's defaults), if any."""
        ...

    def door(self, request: gr.Request | None) -> DoorView: ...


_registered: AppServices | None = None


def register(services: AppServices | None) -> None:
    """The tier that serves apps in this process (the frontend); None: none (one process)."""
    global _registered
    _registered = services


def services() -> AppServices:
    """The tier's services, or :class:`LocalServices` in one process."""
    return _registered if _registered is not None else _LOCAL


class LocalServices:
    """One process, as plain Gradio: the GPU function runs here, no one is counted."""

    def __init__(self) -> None:
        self._secret = secrets.token_hex(32)

    @property
    def browser_secret(self) -> str:
        return self._secret

    async def follow(
        self, fn: Callable[..., Any], payloads: list[Any], request: gr.Request | None
    ) -> AsyncGenerator[Status | list[Any], None]:
        from gradio import utils as gr_utils
        from gradio.context import LocalContext

        from splitspace.shared.app.files import outline_files
        from splitspace.shared.app.gpu_function import gpu_function
        from splitspace.shared.app.loader import gpu_endpoints
        from splitspace.shared.app.processing import EventProcessing

        blocks = LocalContext.blocks.get(None)  # (the Blocks whose event this is)
        record = gpu_function(fn)
        endpoint = next((e for e in gpu_endpoints(blocks) if e.record is record), None) if blocks else None
        if endpoint is None:
            raise ValueError(f"{getattr(fn, '__name__', fn)!r} is no @splitspace.gpu event of this app")
        event, cache = EventProcessing.of(endpoint), gr_utils.get_upload_folder()
        limit = 2**40
        args = await asyncio.to_thread(event.preprocess, payloads, cache_dir=cache, max_file_bytes=limit)
        outputs = await asyncio.to_thread(event.call, args)
        data = await event.postprocess(outputs, max_file_bytes=limit)
        yield await asyncio.to_thread(outline_files, data, cache, max_bytes=limit)

    async def standing(self, request: gr.Request | None) -> dict[str, Any]:
        import gradio as gr

        raise gr.Error("no quota here: this app runs in one process", title="No quota")

    def gpu_health(self) -> dict[str, Any] | None:
        return None

    def door(self, request: gr.Request | None) -> DoorView:
        return DoorView()


_LOCAL = LocalServices()
