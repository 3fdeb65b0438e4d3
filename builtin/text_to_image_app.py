"""The built-in text-to-image, as an app on the developer API.

``splitspace dev`` serves it when given no APP, exactly as ``splitspace dev`` with this file
would; ``python text_to_image_app.py`` runs it in one process. Nothing here is the tiers':

- ``generate`` is a ``@splitspace.gpu(batch=True)`` function: the GPU tier batches calls
  across clients in fair order, only calls its model can run in one pass together
  (``batch_key``: size, steps, guidance), each with its own seed;
- its ``/generate`` API takes what it always took (prompt, negative prompt, width,
  height, steps, guidance scale, seed) and answers the image and its info; the info's
  timings and client are the call's, as the tier measured them (``report``);
- the page (``builtin/page.py``) follows ``generate`` through the serving tier's
  services (``shared/app/services.py``), as any app's CPU event may: its place in line in
  words, a refusal explained with a countdown, the quota bar, examples, recent images;
- the model is the GPU tier's (``SPLITSPACE_MODEL``, loaded when the tier starts; here, at
  first use), and a live model change (``splitspace model``) is one for this app: its
  defaults, name and batch cap are read from the model in use at each call.

Importing this file loads no model (the frontend imports it too).
"""

from __future__ import annotations

import secrets
from collections.abc import Hashable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import gradio as gr

import splitspace
from splitspace.builtin.page import AppPage, browser_state_secret, build_page
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.calls import CallInfo
from splitspace.shared.contract.errors import ValidationFailed
from splitspace.shared.contract.schema import MAX_SEED, REQUEST_FIELDS, GenerateRequest, Limits, validate_request

if TYPE_CHECKING:
    from PIL.Image import Image

    from splitspace.gpu_backend.workload.model import ModelExecutor

SETTINGS = Settings()
LIMITS: Limits = SETTINGS.limits
GRADIO_MAX_BATCH = 16
"""Gradio's own batch cap for this event in one process (the tiers read ``batch_cap``)."""


def model() -> ModelExecutor:
    """The model in use: the GPU tier's, else (one process) ``SPLITSPACE_MODEL``, loaded now."""
    from splitspace.gpu_backend.workload import gpu

    try:
        return gpu.current_executor()
    except RuntimeError:
        return gpu.load_model(SETTINGS.model)


def batch_cap() -> int:
    """The most calls one batch takes: ``SPLITSPACE_MAX_BATCH``, capped by the model's own."""
    from splitspace.gpu_backend.workload import gpu

    model()
    return gpu.batch_cap(SETTINGS.max_batch)


def _one(value: Any) -> Any:
    """A batch event's value for one call (a list of one) as the call's own."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def request_of(*values: Any) -> GenerateRequest:
    """One call's inputs (in ``REQUEST_FIELDS`` order) as a checked request."""
    return validate_request(**dict(zip(REQUEST_FIELDS, map(_one, values), strict=True)), limits=LIMITS)


def resolved(request: GenerateRequest) -> GenerateRequest:
    """The request with every choice made: the model's preset for steps and guidance left
    unset, a random seed for -1."""
    steps, guidance = model().resolve(request)
    seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
    return replace(request, steps=steps, guidance_scale=guidance, seed=seed)


def shape(request: GenerateRequest) -> tuple[int, int, int, float]:
    """What calls of one pipeline pass share: size, steps, guidance (the preset's if unset)."""
    steps, guidance = model().resolve(request)
    return request.width, request.height, steps, guidance


def batch_key(*values: Any) -> Hashable:
    return shape(request_of(*values))


def duration(*columns: list[Any]) -> float:
    """Seconds the calls take on the GPU: the model's estimate for each pipeline pass (on
    ZeroGPU, with the safety margin ZeroGPU needs)."""
    from splitspace.gpu_backend.workload import gpu

    requests = [request_of(*row) for row in zip(*columns, strict=True)]
    groups: dict[tuple[int, int, int, float], int] = {}
    for request in requests:
        groups[shape(request)] = groups.get(shape(request), 0) + 1
    estimate = sum(
        model().estimate_seconds(steps, width, height, n, guidance_scale=guidance)
        for (width, height, steps, guidance), n in groups.items()
    )
    return gpu.zerogpu_duration(estimate)


def report(outputs: list[Any], info: CallInfo) -> list[Any]:
    """The image's info with the call's own timings and client, as the tier measured them."""
    image, details = outputs
    timings = {"queue_s": info.queue_s, "gpu_s": info.gpu_s, "total_s": info.total_s, "client": info.client}
    return [image, {**details, **timings}]


@splitspace.gpu(batch=True, max_batch_size=batch_cap, duration=duration, batch_key=batch_key, report=report)
def generate(
    prompt: list[str],
    negative_prompt: list[str],
    width: list[int],
    height: list[int],
    steps: list[int | None],
    guidance_scale: list[float | None],
    seed: list[int],
) -> tuple[list[Image], list[dict[str, Any]]]:
    """Generate one image per call; each call's info says its seed, size, steps, guidance,
    model and (from the tier) its queue, GPU and total seconds and whose call it was."""
    executor = model()
    requests = [
        resolved(request_of(*row))
        for row in zip(prompt, negative_prompt, width, height, steps, guidance_scale, seed, strict=True)
    ]
    images: list[Any] = [None] * len(requests)
    passes: dict[tuple[int, int, int, float], list[int]] = {}
    for i, request in enumerate(requests):  # one pipeline pass per shape (the tiers send one)
        passes.setdefault(shape(request), []).append(i)
    for indices in passes.values():
        batch = [requests[i] for i in indices]
        # one alone: the model's single call, as the tier's own batching makes it
        made = (
            [executor.generate(batch[0], batch[0].seed)]
            if len(batch) == 1
            else executor.generate_batch(batch, [r.seed for r in batch])
        )
        for i, image in zip(indices, made, strict=True):
            images[i] = image
    infos = [
        {
            "seed": r.seed,
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance_scale": r.guidance_scale,
            "model": executor.name,
        }
        for r in requests
    ]
    return images, infos


def check(*values: Any) -> Any:
    """The event's ``validator=``: the request's own checks, naming the field they refuse. A
    batch event's validator answers in the batch form (one list per input: one call's verdict)."""
    try:
        request_of(*values)
    except ValidationFailed as exc:
        said = str(exc).removeprefix(f"{exc.field}: ")  # the input's label names it
        return [[gr.validate(name != exc.field, said if name == exc.field else "")] for name in REQUEST_FIELDS]
    return [[gr.validate(True, "")] for _ in REQUEST_FIELDS]


def _api(inputs: list[Any], outputs: list[Any]) -> Any:
    # preprocess=False: the request's own checks see the values as sent (steps and guidance
    # may be null: the model's preset), not the sliders' reading of them.
    return gr.on(
        [],
        generate,
        inputs,
        outputs,
        api_name="generate",
        batch=True,
        max_batch_size=GRADIO_MAX_BATCH,
        concurrency_limit=None,
        preprocess=False,
        validator=check,
    )


_secret = browser_state_secret(SETTINGS.secrets) if SETTINGS.secrets else secrets.token_hex(32)
demo = build_page(LIMITS, AppPage(generate, browser_secret=_secret), _api)

if __name__ == "__main__":
    demo.launch()
