"""OpenAI's images API over the built-in text-to-image: ``POST /v1/images/generations``, ``GET /v1/models``.

Why it exists: the ``openai`` SDK (and every tool built on it) can then use a
splitspace deployment as it is, with ``base_url=<frontend>/v1`` and an API key of
the quota file. Each image is a call of the built-in app's ``generate`` event
(``builtin/text_to_image_app.py``) through ``FrontendCore.follow_call``
(``cpu_frontend/core.py``), the path of every app's GPU events, so nothing here is a
second way in:

- identity: ``FrontendCore.identity`` (an ``Authorization: Bearer`` key, the session
  cookie, the address), resolved once before anything is counted;
- inputs: the body's fields by the ``generate`` inputs' names (``size`` as ``width``
  and ``height``; ``steps`` and ``guidance_scale`` unset: the model's preset; the
  rest unset: the event's defaults); pydantic only reads the OpenAI body's shape
  (types, ``n``, ``size`` as ``WxH``, ``response_format``);
- validation: the app path's one validation (``FrontendCore.check_call``: the
  components' ranges, then the built-in's ``validator=``), before any place is taken
  (a bad body is a 400, from a client at its cap too); a refused input is named by the
  body's parameter (``size`` for ``width`` or ``height``);
- the door: each of the ``n`` images joins its client's line with
  ``FrontendCore.join_door``, as ``n`` separate calls would; if any is refused (the
  client's cap) every place is given back and the answer is 429. The places are
  handed to ``FrontendCore.follow_call`` with a one-time pass, as the door's middleware
  hands a held REST call to Gradio, and the ``n`` run concurrently; a caller who
  goes away cancels them (the GPU tier drops their jobs);
- errors: the project's errors become OpenAI's ``{"error": {message, type, param,
  code}}`` in one function, :func:`openai_error`, with the status the SDK maps to
  its exception classes (400 ``BadRequestError``, 401 ``AuthenticationError``, 429
  ``RateLimitError`` with ``retry-after``, 5xx ``InternalServerError``).

``response_format="url"`` answers with a capability URL: the PNG where it landed in the
frontend's Gradio cache, which Gradio serves (``/gradio_api/file=<path>``, under a
directory named by the image's sha256), readable by whoever holds the URL, without
credentials, for ``SPLITSPACE_JOB_TTL_S`` after the image landed, as a job's results
(``cpu_frontend.core.expire_images`` deletes it then).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.
import asyncio
import base64
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter
from gradio.route_utils import get_root_url
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictStr
from pydantic import ValidationError as PydanticError
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from splitspace.cpu_frontend.api.input_names import Function, describe
from splitspace.cpu_frontend.api.validation import InputRefused
from splitspace.cpu_frontend.core import CheckedCall
from splitspace.cpu_frontend.door.door import FairDoor, Place
from splitspace.cpu_frontend.door.door_middleware import DOOR_PASS_HEADER
from splitspace.session.identity import Identity
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.errors import (
    QUEUE_FULL,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    BackendUnavailable,
    GpuFailed,
    ServiceUnavailable,
    SplitspaceError,
    Throttled,
    Unauthorized,
    ValidationFailed,
)
from splitspace.shared.contract.hop import Status
from splitspace.shared.contract.schema import echo
from splitspace.shared.http import guard

log = logging.getLogger("splitspace.openai")

MAX_IMAGES = 10
"""OpenAI's own bound of ``n``."""
OWNER = "splitspace"
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_PARAM_OF_FIELD = {"width": "size", "height": "size"}
"""Request fields that the OpenAI body names otherwise."""
_THROTTLE_CODES = {QUEUE_FULL: "queue_full", RATE_LIMITED: "rate_limit_exceeded", QUOTA_EXCEEDED: "insufficient_quota"}
_REFUSAL_CODES = {
    guard.MALFORMED: "invalid_json",
    guard.TOO_LARGE: "request_too_large",
    guard.FORMS_REFUSED: "unsupported_media_type",
    guard.TOO_SLOW: "request_timeout",
}
"""The codes of the guard's refusals, by their title (:func:`openai_refusal`)."""
OPENAI_PATHS = ("/v1/images/", "/v1/models")
"""Where this module's routes are: the guard answers their refusals in OpenAI's shape."""
_SDK_RETRY_MAX_S = 60
"""The openai SDK retries a 429 after ``retry-after`` only up to this many seconds (else at
once, with its own backoff): a longer wait gets ``x-should-retry: false``."""


class _Health(Protocol):
    def health(self) -> dict[str, Any] | None: ...


class ImagesFrontend(Protocol):
    """What the route uses of ``cpu_frontend.core.FrontendCore``."""

    @property
    def settings(self) -> Settings: ...

    @property
    def pool(self) -> _Health:
        """The GPU tiers: the latest health document names the model served."""

    @property
    def door(self) -> FairDoor: ...

    def identity(self, request: HTTPConnection | None) -> Identity: ...

    async def join_door(self, identity: Identity, parked: bool = False) -> Place: ...

    async def check_call(self, endpoint: GpuEndpoint, payloads: list[Any]) -> CheckedCall: ...

    def follow_call(
        self, endpoint: GpuEndpoint, payloads: list[Any] | CheckedCall, request: HTTPConnection | None
    ) -> AsyncGenerator[Status | list[Any], None]: ...


class ImageGeneration(BaseModel):
    """The body of ``POST /v1/images/generations``: OpenAI's fields, and the built-in's own
    inputs (``seed``, ``steps``, ``guidance_scale``, ``negative_prompt``) for ``extra_body``.
    Other fields are ignored, as OpenAI's servers ignore what they do not know."""

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr
    model: StrictStr | None = None
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] | None = None
    size: StrictStr | None = None
    """``WxH`` (e.g. ``512x512``); ``auto`` or none: ``generate``'s default width and height."""
    response_format: Literal["b64_json", "url"] | None = None
    seed: int | None = None
    """Image ``i`` of ``n`` gets ``seed + i``; none or -1: random."""
    steps: int | None = Field(None, validation_alias=AliasChoices("steps", "num_inference_steps"))
    guidance_scale: float | None = None
    negative_prompt: StrictStr | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    user: StrictStr | None = None
    """Accepted and not used: who the caller is comes from its key, cookie or address."""

    def payloads(self, generate: Function) -> list[list[Any]]:
        """The ``n`` calls' inputs, in the order of ``generate``'s: the body's fields by the
        inputs' names, the others the event's defaults (``steps`` and ``guidance_scale``
        unset: None, the model's preset). Checked on the app path, not here."""
        values: dict[str, Any] = {
            **generate.defaults,
            "prompt": self.prompt,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.size is not None and self.size.strip().lower() != "auto":
            m = _SIZE.match(self.size)
            if m is None:
                raise ValidationFailed("size", f"must be WIDTHxHEIGHT, e.g. 512x512, got {echo(self.size)}")
            values["width"], values["height"] = int(m.group(1)), int(m.group(2))
        if self.negative_prompt is not None:
            values["negative_prompt"] = self.negative_prompt
        calls = []
        for i in range(self.n or 1):
            if self.seed is not None:
                values["seed"] = self.seed + i if self.seed >= 0 else self.seed
            calls.append([values[name] for name in generate.inputs])
        return calls


class ModelNotFound(ValidationFailed):
    """A model this server does not serve, asked for by its id (``GET /v1/models/<id>``): 404."""

    def __init__(self, model: str) -> None:
        super().__init__("model", f"the model {echo(model)} does not exist")


def openai_error(exc: BaseException) -> JSONResponse:
    """The one mapping of this edge: an error as OpenAI's body, status and headers."""
    status, kind, param, code = 500, "server_error", None, None
    headers: dict[str, str] = {}
    message = "the server failed on this request"
    if isinstance(exc, PydanticError):
        first = exc.errors(include_url=False)[0]
        param = str(first["loc"][0]) if first["loc"] else None
        missing = first["type"] == "missing"
        got = "" if missing or param is None else f" (got {echo(first['input'])})"
        status, kind, message = 400, "invalid_request_error", f"Invalid '{param}': {first['msg']}{got}"
        code = "missing_required_parameter" if missing else "invalid_value"
        if param is None:
            message = f"the body must be a JSON object: {first['msg']}"
            code = "invalid_json" if first["type"] == "json_invalid" else code
    elif isinstance(exc, ValidationFailed):
        param = _PARAM_OF_FIELD.get(exc.field, exc.field)
        what = exc.message.partition(": ")[2] or exc.message
        said = what if param == exc.field else f"{exc.field} {what}"
        status, kind, message = 400, "invalid_request_error", f"Invalid '{param}': {said}"
        code = "model_not_found" if param == "model" else "invalid_value"
        if isinstance(exc, ModelNotFound):
            status, message = 404, exc.message.partition(": ")[2]
    elif isinstance(exc, Unauthorized):
        status, kind, code, message = 401, "invalid_request_error", "invalid_api_key", exc.message
    elif isinstance(exc, (Throttled, ServiceUnavailable)):
        status, message = (429, exc.message) if isinstance(exc, Throttled) else (503, exc.message)
        if isinstance(exc, Throttled):
            kind = "insufficient_quota" if exc.title == QUOTA_EXCEEDED else "requests"
            code = _THROTTLE_CODES.get(exc.title, "rate_limit_exceeded")
        else:
            code = "service_unavailable"
        headers["retry-after"] = str(exc.retry_after_whole_s)
        if exc.retry_after_whole_s > _SDK_RETRY_MAX_S:
            headers["x-should-retry"] = "false"
    elif isinstance(exc, BackendUnavailable):
        status, code, message = 503, "backend_unavailable", exc.user_text()
    elif isinstance(exc, GpuFailed):
        status, code, message = 502, "gpu_error", exc.user_text()
    elif isinstance(exc, SplitspaceError):
        message = exc.user_text()
    else:
        log.error("openai images: %s", echo(exc, 200), exc_info=exc)
    headers["cache-control"] = "no-store"
    return JSONResponse(_error_doc(message, kind, param, code), status, headers=headers)


def openai_refusal(status: int, title: str, message: str) -> dict[str, Any]:
    """A body the frontend's guard refuses before the route reads it (not JSON, over the
    size or JSON limits, a form: ``shared/http/guard.py``), in OpenAI's shape; the guard
    keeps its status (400, 413, 415, 408)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _error_doc(f"{title}: {message}", kind, None, _REFUSAL_CODES.get(title, "invalid_request"))


def _error_doc(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Gone(Exception):
    """The caller closed the connection."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    raise _Gone


def openai_routes(fe: ImagesFrontend, endpoint: GpuEndpoint) -> APIRouter:
    """The routes; ``endpoint``: the built-in app's ``generate`` event, as the frontend serves it."""
    router = APIRouter(prefix="/v1", include_in_schema=False)
    started = int(time.time())
    generate = describe(endpoint)

    def model_name() -> str:
        return str((fe.pool.health() or {}).get("model") or fe.settings.model)

    def model_doc(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": OWNER}

    @router.get("/models")
    async def models(request: Request) -> Response:
        try:
            fe.identity(request)
        except SplitspaceError as exc:
            return openai_error(exc)
        return JSONResponse({"object": "list", "data": [model_doc(model_name())]})

    @router.get("/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        try:
            fe.identity(request)
        except SplitspaceError as exc:
            return openai_error(exc)
        if model_id != model_name():
            return openai_error(ModelNotFound(model_id))
        return JSONResponse(model_doc(model_id))

    @router.post("/images/generations")
    async def generations(request: Request) -> Response:
        places: list[tuple[Place, str]] = []
        try:
            identity = fe.identity(request)
            body = ImageGeneration.model_validate_json(await request.body())
            served = model_name()
            if body.model is not None and body.model != served:
                raise ValidationFailed("model", f"this server serves {served!r}, got {echo(body.model)}")
            # checked before any place is taken: a bad body is a 400 even for a client at its cap
            calls = [await _checked(fe, endpoint, generate, payloads) for payloads in body.payloads(generate)]
            for _ in calls:  # all or none: a refusal of any gives every place back
                place = await fe.join_door(identity)
                places.append((place, fe.door.hand_over(place)))
            images = [_one(fe, request, endpoint, call, nonce) for call, (_, nonce) in zip(calls, places, strict=True)]
            paths = await _run_all(request, images)
            data = await asyncio.to_thread(_answer, paths, body.response_format or "b64_json", _root_url(request))
        except _Gone:
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - every error is answered in OpenAI's shape
            return openai_error(exc)
        finally:
            for place, nonce in places:  # a pass never taken (the image never started) gives its place back
                fe.door.take(nonce, place.flow_id)
                place.leave()
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png"})

    return router


async def _checked(fe: ImagesFrontend, endpoint: GpuEndpoint, generate: Function, payloads: list[Any]) -> CheckedCall:
    """One image's call, checked on the app path (``FrontendCore.check_call``); a refused
    input is named as the body names it (its input's name, not its label)."""
    try:
        return await fe.check_call(endpoint, payloads)
    except InputRefused as exc:
        if exc.position is None:
            raise
        said = exc.message.removeprefix(f"{exc.field}: ")
        raise ValidationFailed(generate.inputs[exc.position - 1], said) from None


async def _one(fe: ImagesFrontend, request: Request, endpoint: GpuEndpoint, call: CheckedCall, nonce: str) -> str:
    """One image through ``FrontendCore.follow_call`` with its place's pass; the PNG's path
    in the frontend's cache (the first output, a FileData)."""
    scope = {**request.scope, "headers": [*request.scope["headers"], (DOOR_PASS_HEADER.encode(), nonce.encode())]}
    updates = fe.follow_call(endpoint, call, Request(scope))
    try:
        async for update in updates:
            if isinstance(update, list):
                image = update[0] if update else None
                if isinstance(image, dict) and isinstance(image.get("path"), str):
                    return image["path"]
                break
    finally:
        await updates.aclose()
    raise GpuFailed("the model answered no image")


async def _run_all(request: Request, jobs: Sequence[Awaitable[str]]) -> list[str]:
    """Run the images concurrently; the first failure (or the caller leaving) cancels the rest."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        pending: set[asyncio.Future[Any]] = {*tasks, gone}
        while any(not t.done() for t in tasks):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                failed = t.exception()
                if failed is not None:
                    raise failed
        return [t.result() for t in tasks]
    finally:
        gone.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(gone, *tasks, return_exceptions=True)


def _root_url(request: Request) -> str:
    return get_root_url(request, request.url.path, request.scope.get("root_path") or None)


def _answer(paths: list[str], response_format: str, root: str) -> list[dict[str, str]]:
    if response_format == "url":
        return [{"url": f"{root}/gradio_api/file={path}"} for path in paths]
    return [{"b64_json": base64.b64encode(Path(path).read_bytes()).decode("ascii")} for path in paths]
