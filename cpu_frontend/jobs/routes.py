"""``/v1/jobs``: durable jobs over HTTP, and the wiring that builds them from the frontend's core.

- ``POST /v1/jobs`` ``{"endpoint", "inputs" | "data", "webhook_url"?, "webhook_events"?}``
  (``Idempotency-Key`` header optional): 202 with the job (``Location`` its URL); 400
  naming the input (a GPU function of the served app: checked as Gradio's API checks it, files
  given inline: ``file_inputs.py``); 413 over the body limit (the guard's); 429 with
  ``Retry-After`` over the client's in-flight cap (the same cap, line and fair share as
  the Gradio API: ``runner.py``).
- ``GET /v1/jobs/{id}`` (``?include=b64``: files' bytes inline), ``GET /v1/jobs`` (the
  caller's own, newest first, ``limit`` and ``cursor``), ``POST /v1/jobs/{id}/cancel``,
  ``GET /v1/jobs/{id}/files/{n}``: only the job's owner (same API key, session cookie or
  address) gets anything but 404.
- ``GET /v1/openapi.json``: the OpenAPI document of every ``/v1`` route.

Errors are ``{"title", "message"}`` (plus ``field`` or ``retry_after_s``), as everywhere
in splitspace (``shared/contract/errors.py``).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.
import base64
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticError
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from splitspace.cpu_frontend.door.door import FairDoor, Place
from splitspace.cpu_frontend.door.limits import InflightCaps
from splitspace.cpu_frontend.hop.backends import BackendPool
from splitspace.cpu_frontend.jobs.records import EVENTS
from splitspace.cpu_frontend.jobs.redis_store import RedisJobStore
from splitspace.cpu_frontend.jobs.runner import JobConflict, JobNotFound, JobRunner
from splitspace.cpu_frontend.jobs.sqlite_store import SqliteJobStore
from splitspace.cpu_frontend.jobs.store import JobStore
from splitspace.cpu_frontend.jobs.targets import FunctionTarget
from splitspace.cpu_frontend.jobs.views import file_indexes, job_view
from splitspace.cpu_frontend.jobs.webhooks import Deliveries, Sender
from splitspace.session.identity import Identity
from splitspace.session.token import IdentityTokens
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.config.quota_watch import QuotaWatcher
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.calls import base64_body_limit
from splitspace.shared.contract.errors import (
    QUEUE_FULL,
    ServiceUnavailable,
    SplitspaceError,
    Throttled,
    Unauthorized,
    ValidationFailed,
    to_wire,
)
from splitspace.shared.http.json_limits import DEFAULT_LIMITS, JsonLimits

MAX_PAGE = 100
JOBS_PATH = "/v1/jobs"


class JobCreate(BaseModel):
    """A job: which endpoint, its inputs (by name, or a list in the endpoint's order), and
    optionally a webhook (needs an API key with a ``webhook_secret``)."""

    model_config = ConfigDict(extra="forbid")
    endpoint: str = Field(min_length=1, max_length=120, examples=["/generate"])
    inputs: dict[str, Any] | None = Field(default=None, examples=[{"prompt": "a red fox", "seed": 42}])
    data: list[Any] | None = None
    webhook_url: str | None = Field(default=None, max_length=2048)
    webhook_events: list[Literal["started", "completed", "failed", "cancelled"]] | None = None


class FileOutput(BaseModel):
    type: Literal["file"]
    url: str
    name: str
    mime_type: str
    size: int
    b64: str | None = None


class JobError(BaseModel):
    title: str
    message: str


class WebhookAttempt(BaseModel):
    webhook_id: str
    event: str
    attempt: int
    at: float
    ok: bool
    status_code: int | None
    error: str | None
    next_attempt_at: float | None


class JobView(BaseModel):
    id: str
    object: Literal["job"]
    endpoint: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    position: int | None = Field(default=None, description="queued: the place in line (1 = next)")
    eta_s: float | None = None
    outputs: list[Any] | None = Field(default=None, description="succeeded: one value per output; files as FileOutput")
    error: JobError | None = None
    webhook: dict[str, Any] | None
    webhook_attempts: list[WebhookAttempt] | None = None
    links: dict[str, str]


class JobList(BaseModel):
    object: Literal["list"]
    data: list[JobView]
    has_more: bool
    next_cursor: str | None


class Problem(BaseModel):
    title: str
    message: str
    field: str | None = None
    retry_after_s: float | None = None


_STATUS = (
    (ValidationFailed, 400),
    (Unauthorized, 401),
    (JobNotFound, 404),
    (JobConflict, 409),
    (Throttled, 429),
    (ServiceUnavailable, 503),
)


def problem(exc: SplitspaceError, seconds_per_job: float = 1.0) -> JSONResponse:
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 502)
    headers: dict[str, str] = {"cache-control": "no-store"}
    body = to_wire(exc)
    if isinstance(exc, Throttled | ServiceUnavailable):
        retry = exc.retry_after_s
        if exc.title == QUEUE_FULL:  # a place frees when one of the client's calls ends: about a job's time
            retry = max(retry, seconds_per_job)
        body["retry_after_s"] = round(retry, 3)
        headers["retry-after"] = str(max(1, int(retry + 0.999)))
    return JSONResponse(body, status_code=status, headers=headers)


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (400, 401, 404, 409, 429, 503)}


def job_routes(
    runner: JobRunner,
    store: JobStore,
    identify: Callable[[Request], Identity],
    seconds_per_job: Callable[[], float] = lambda: 1.0,
) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["jobs"])

    def base_of(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @router.post(
        "/jobs",
        status_code=202,
        response_model=None,
        summary="Submit a job",
        responses={
            202: {
                "model": JobView,
                "description": "Accepted (or, with a retried Idempotency-Key, the same "
                "job again: header Idempotent-Replayed)",
            },
            **_ERRORS,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": JobCreate.model_json_schema()}},
            },
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 255},
                }
            ],
        },
    )
    async def create_job(request: Request) -> Response:
        try:
            identity = identify(request)
            spec = _body(await request.body())
            job, replayed = await runner.submit(
                identity,
                spec.endpoint,
                inputs=spec.inputs,
                data=spec.data,
                webhook_url=spec.webhook_url,
                webhook_events=list(spec.webhook_events) if spec.webhook_events is not None else None,
                idempotency_key=request.headers.get("idempotency-key"),
                base_url=base_of(request),
            )
        except SplitspaceError as exc:
            return problem(exc, seconds_per_job())
        view = job_view(job, base_of(request))
        headers = {"location": view["links"]["self"]}
        if replayed:
            headers["idempotent-replayed"] = "true"
        return JSONResponse(view, status_code=202, headers=headers)

    @router.get("/jobs", response_model=JobList, responses=_ERRORS, summary="List your jobs, newest first")
    async def list_jobs(
        request: Request, limit: int = Query(20, ge=1, le=MAX_PAGE), cursor: str | None = Query(None, max_length=64)
    ) -> Response:
        try:
            owner = identify(request).client_id
            jobs = await runner.page(owner, limit + 1, cursor)
        except SplitspaceError as exc:
            return problem(exc)
        more = len(jobs) > limit
        data = [job_view(job, base_of(request)) for job in jobs[:limit]]
        return JSONResponse(
            {"object": "list", "data": data, "has_more": more, "next_cursor": data[-1]["id"] if more else None}
        )

    @router.get("/jobs/{job_id}", response_model=JobView, responses=_ERRORS, summary="A job, with its outputs")
    async def get_job(
        request: Request,
        job_id: str,
        include: str | None = Query(
            None, description="`b64`: each output file's bytes inline, base64", pattern="^b64$"
        ),
    ) -> Response:
        try:
            job = await runner.get(identify(request).client_id, job_id)
        except SplitspaceError as exc:
            return problem(exc)
        b64: dict[int, str] | None = None
        if include == "b64" and job.status == "succeeded":
            b64 = {}
            for index in file_indexes(job.outputs):
                f = await store.file(job.id, index)
                if f is not None:
                    b64[index] = base64.b64encode(f.data).decode("ascii")
        return JSONResponse(job_view(job, base_of(request), await store.attempts(job.id), b64))

    @router.post("/jobs/{job_id}/cancel", response_model=JobView, responses=_ERRORS, summary="Cancel a job")
    async def cancel_job(request: Request, job_id: str) -> Response:
        try:
            job = await runner.cancel(identify(request).client_id, job_id)
        except SplitspaceError as exc:
            return problem(exc)
        return JSONResponse(job_view(job, base_of(request), await store.attempts(job.id)))

    @router.get(
        "/jobs/{job_id}/files/{index}", response_class=Response, responses=_ERRORS, summary="One output file of a job"
    )
    async def job_file(request: Request, job_id: str, index: int) -> Response:
        try:
            job = await runner.get(identify(request).client_id, job_id)
            f = await store.file(job.id, index) if job.status == "succeeded" else None
            if f is None:
                raise JobNotFound(f"job {job.id} has no file {index}")
        except SplitspaceError as exc:
            return problem(exc)
        name = json.dumps(f.name)  # quoted and escaped
        return Response(
            f.data,
            media_type=f.mime_type,
            headers={
                "content-disposition": f"inline; filename={name}",
                "cache-control": "private, max-age=3600",
                "x-content-type-options": "nosniff",
            },
        )

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        full = request.app.openapi()  # FastAPI's own document of the whole app, cut to /v1
        paths = {path: item for path, item in full.get("paths", {}).items() if path.startswith("/v1/")}
        info = {
            "title": "splitspace /v1",
            "version": "1",
            "description": "Durable jobs with signed webhooks (docs/jobs.md), and what else lives under /v1.",
        }
        return JSONResponse({**full, "info": info, "paths": paths})

    return router


def _body(raw: bytes) -> JobCreate:
    try:
        doc = json.loads(raw or b"null")
    except ValueError:
        raise ValidationFailed("body", "is not JSON") from None
    if not isinstance(doc, dict):
        raise ValidationFailed("body", "must be a JSON object")
    try:
        return JobCreate.model_validate(doc)
    except PydanticError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        raise ValidationFailed(field, str(err["msg"])) from None


# -- wiring -----------------------------------------------------------------------------------
class FrontendParts(Protocol):
    """What jobs use of the frontend's core (``cpu_frontend/core.py``)."""

    settings: Settings
    pool: BackendPool
    tokens: IdentityTokens
    caps: InflightCaps
    door: FairDoor
    watcher: QuotaWatcher
    seconds_per_job: float
    cache_dir: str

    def identity(self, request: HTTPConnection | None) -> Identity: ...

    def learn_gpu_s(self, gpu_s: float) -> None: ...

    async def join_door(self, identity: Identity, parked: bool = False) -> Place: ...


def open_store(settings: Settings) -> JobStore:
    if settings.redis_url is not None:
        return RedisJobStore(settings.redis_url.get_secret_value())
    return SqliteJobStore(settings.jobs_path)


class JobsService:
    """The jobs of one frontend: its runner, its routes, started and stopped with the app."""

    def __init__(self, fe: FrontendParts, endpoints: Sequence[GpuEndpoint] = (), store: JobStore | None = None) -> None:
        """``endpoints``: the served app's GPU functions (``SPLITSPACE_APP``, else the built-in
        app's ``generate``), found once by the frontend before it rewires them."""
        settings = fe.settings
        self.store = store or open_store(settings)

        def learn(identity: Identity, cap: int | None) -> None:
            fe.caps.learn(identity, cap)

        target = FunctionTarget(
            endpoints,
            fe.pool,
            fe.tokens,
            max_file_bytes=settings.max_file_bytes,
            cache_dir=fe.cache_dir,
            learn_cap=learn,
            on_gpu_s=fe.learn_gpu_s,  # the ETA of those waiting at the door, as the Gradio path learns it
        )

        def rejoin(identity: Identity) -> Place:
            terms = fe.caps.terms(identity)  # accepted before: no cap refuses it now
            return fe.door.join(identity.flow_id, sys.maxsize, terms.weight, terms.running)

        def refresh(identity: Identity) -> Identity:
            """A key's tier as the quota file says now; a key taken out of it runs no more."""
            if identity.kind != "key":
                return identity
            config = fe.watcher.current
            if not any(k.client_id == identity.client_id for k in config.keys):
                raise Unauthorized("the job's API key is no longer in the quota file")
            return Identity(identity.client_id, "key", config.key_tier(identity.client_id), identity.address)

        def secret_of(client_id: str) -> str | None:
            return fe.watcher.current.webhook_secret(client_id)

        runner_id = JobRunner.new_runner_id()
        self.deliveries = Deliveries(
            self.store,
            runner_id,
            secret_of,
            Sender(settings.webhook_networks, connections=settings.webhook_workers),
            first_s=settings.webhook_backoff_s,
            max_attempts=settings.webhook_attempts,
            workers=settings.webhook_workers,
            ttl_s=settings.job_ttl_s,
        )
        self.runner = JobRunner(
            store=self.store,
            targets=target,
            join=fe.join_door,
            rejoin=rejoin,
            deliveries=self.deliveries,
            secret_of=secret_of,
            seconds_per_job=lambda: fe.seconds_per_job,
            refresh=refresh,
            webhook_allow=settings.webhook_networks,
            ttl_s=settings.job_ttl_s,
            lease_s=settings.lease_s,
        )
        self.router = job_routes(self.runner, self.store, fe.identity, lambda: fe.seconds_per_job)
        self.body_limits: dict[str, int] = {}
        """For the frontend's guard: a developer's function may take files, given inside the
        job's body as base64: ``POST /v1/jobs`` takes a file of ``max_file_bytes`` and the
        rest of the call, as the GPU tier's call route does (more: a 413 naming the limit)."""
        self.json_limits: dict[str, JsonLimits] = {}
        if settings.app:
            limit = base64_body_limit(settings.max_file_bytes)
            self.body_limits[JOBS_PATH] = limit
            self.json_limits[JOBS_PATH] = dataclasses.replace(DEFAULT_LIMITS, max_string_bytes=limit)

    async def start(self) -> None:
        await self.runner.start()

    async def aclose(self) -> None:
        await self.runner.aclose()


__all__ = ["EVENTS", "JobsService", "job_routes", "open_store"]
