"""The CPU tier's Gradio edge: the public UI and API, thin over ``core.py``, and the app's wiring.

The frontend always serves an app: the developer's (``SPLITSPACE_APP``) or, given none,
the built-in text-to-image (``builtin/text_to_image_app.py``), loaded as any app is. The
handler of each ``@splitspace.gpu`` event (``ui/app_events.py``), and ``/quota``, hand
the Starlette request under their ``gr.Request`` to
:class:`~cpu_frontend.core.FrontendCore`, which holds identity, validation, the fair door
and the hop, and turn its errors into ``gr.Error`` in one place (:func:`gradio_errors`);
every event without the decorator runs here. The handlers are async generators with no
concurrency limit, so the frontend has no first-in-first-out stage, and a caller who goes
away closes the stream to the GPU tier, which drops the queued job.
"""

# No `from __future__ import annotations` here: Gradio evaluates the handlers' type hints
# on every call, and string annotations make that an eval each time.
import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import gradio as gr
from fastapi import FastAPI
from gradio import utils as gr_utils
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from splitspace.builtin import APP as BUILTIN_APP
from splitspace.builtin import is_builtin
from splitspace.builtin.page import browser_state_secret
from splitspace.cpu_frontend.api import gradio_tuning
from splitspace.cpu_frontend.api.mcp_loopback import McpLoopback
from splitspace.cpu_frontend.api.openai_images import OPENAI_PATHS, openai_refusal, openai_routes
from splitspace.cpu_frontend.api.validation import gradio_validator, is_valid_call
from splitspace.cpu_frontend.core import FrontendCore, expire_images_every
from splitspace.cpu_frontend.door.door_middleware import DoorMiddleware, HeldCalls
from splitspace.cpu_frontend.hop.transport import Transport
from splitspace.cpu_frontend.jobs.routes import JobsService
from splitspace.cpu_frontend.ui.app_events import forward_gpu_events
from splitspace.cpu_frontend.ui.embed import embed_routes
from splitspace.session import SessionCookieMiddleware
from splitspace.shared.app import services as app_services
from splitspace.shared.app.files import use_own_cache
from splitspace.shared.app.gpu_function import gpu_function
from splitspace.shared.app.loader import GpuEndpoint, gpu_endpoints, load_app
from splitspace.shared.app.services import DoorView
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.errors import SplitspaceError
from splitspace.shared.contract.hop import Status
from splitspace.shared.gradio.gradio_queue import bound_analytics, hold_sessions, sweep_finished_sessions
from splitspace.shared.gradio.gradio_sessions import (
    HOUSEKEEPING_S,
    HeartbeatCap,
    OpenHeartbeats,
    bound_session_states,
    every,
    forget_finished_states,
    session_count,
)
from splitspace.shared.http.guard import GradioGuard
from splitspace.shared.http.server import NO_TELEMETRY

log = logging.getLogger("splitspace.frontend")

BOOT_ID = uuid.uuid4().hex
"""Changes whenever this process (re)starts; the dev page reloads when it or a GPU tier's changes."""
DEV_RELOAD_SCRIPT = """<script>
(() => {  // splitspace dev --reload: reload the page when either tier restarted
  let seen = null;
  setInterval(async () => {
    try {
      const h = await (await fetch("health", {cache: "no-store"})).json();
      const now = JSON.stringify([h.boot_id, h.backend_boot_ids]);
      if (seen !== null && now !== seen) location.reload();
      seen = now;
    } catch (e) {}
  }, 1000);
})();
</script>"""
MCP_MAX_BODY_BYTES = 64 * 1024


def to_gradio_error(exc: SplitspaceError) -> gr.Error:
    return gr.Error(exc.user_text(), title=exc.title, print_exception=False)


@contextlib.contextmanager
def gradio_errors() -> Iterator[None]:
    """The one place where the Gradio handlers turn the project's errors into ``gr.Error``."""
    try:
        yield
    except SplitspaceError as exc:
        raise to_gradio_error(exc) from None


def http_request(request: gr.Request | None) -> Request | None:
    """The Starlette request under a handler's ``gr.Request`` (what the core reads);
    one Gradio made of its attributes alone is rebuilt from its headers and peer."""
    if request is None:
        return None
    inner = request.request
    if isinstance(inner, Request):
        return inner
    given = dict(getattr(request, "headers", None) or {})
    headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in given.items()]
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return Request({"type": "http", "headers": headers, "client": (host, 0) if host else None})


class Frontend:
    """The Gradio edge of the CPU tier: its handlers, thin over :class:`FrontendCore`."""

    def __init__(self, settings: Settings, transports: list[Transport] | None = None) -> None:
        self.core = FrontendCore(settings, gr_utils.get_upload_folder(), transports)
        self.settings = settings
        self.endpoints: list[GpuEndpoint] = []
        """The app's GPU events, which ``follow`` finds by their function."""

    async def follow_call(
        self, endpoint: GpuEndpoint, payloads: list[Any], request: gr.Request | None, *, validated: bool = False
    ) -> AsyncGenerator[Status | list[Any], None]:
        """A call of the developer's GPU function (``ui/app_events.py``): :meth:`FrontendCore.follow_call`."""
        with gradio_errors():
            updates = self.core.follow_call(endpoint, payloads, http_request(request), validated=validated)
            async with contextlib.aclosing(updates):
                async for update in updates:
                    yield update

    async def quota(self, request: gr.Request = None) -> dict:  # type: ignore[assignment]
        """``/quota``: the caller's own standing, as the GPU tier counts it."""
        with gradio_errors():
            return await self.core.quota(http_request(request))


class AppFrontend:
    """The frontend as an app's CPU events see it (``shared/app/services.py``)."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    @property
    def browser_secret(self) -> str:
        return browser_state_secret(self.fe.settings.secrets)

    def follow(
        self, fn: Callable[..., Any], payloads: list[Any], request: gr.Request | None
    ) -> AsyncGenerator[Status | list[Any], None]:
        """A CPU event's call of the app's GPU function ``fn``: its GPU event's own path."""
        record = gpu_function(fn)
        endpoint = next((e for e in self.fe.endpoints if e.record is record), None)
        if endpoint is None:
            raise ValueError(f"{getattr(fn, '__name__', fn)!r} is no @splitspace.gpu event of this app")
        return self.fe.follow_call(endpoint, payloads, request)

    async def standing(self, request: gr.Request | None) -> dict[str, Any]:
        return await self.fe.quota(request)  # type: ignore[arg-type]

    def gpu_health(self) -> dict[str, Any] | None:
        return self.fe.core.pool.health()

    def door(self, request: gr.Request | None) -> DoorView:
        core = self.fe.core
        try:
            identity = core.identity(http_request(request))
        except SplitspaceError:
            return DoorView(seconds_per_job=core.seconds_per_job)
        return DoorView(core.door.count(identity.flow_id), identity.kind != "key", core.seconds_per_job)


def build_app(settings: Settings | None = None, transports: list[Transport] | None = None) -> FastAPI:
    settings = settings or Settings()
    gradio_tuning.apply()
    fe = Frontend(settings, transports)
    core = fe.core
    # No app: the built-in one (builtin/text_to_image_app.py), served as any app is.
    served = settings.app or BUILTIN_APP
    builtin = not settings.app or is_builtin(settings.app)

    def tells_status(api_name: str) -> bool:
        """The built-in's /generate tells REST clients each status as its info output, as ever."""
        return builtin and api_name == "generate"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(core.watch_quotas())
        sweep = asyncio.create_task(sweep_finished_sessions(blocks))
        # the Gradio state of finished calls (shared/gradio/gradio_sessions.py)
        house = asyncio.create_task(every(HOUSEKEEPING_S, lambda: forget_finished_states(blocks, heartbeats.sessions)))
        images = None if settings.app else asyncio.create_task(expire_images_every(core.cache_dir, settings.job_ttl_s))
        await core.start()
        await jobs.start()
        try:
            yield
        finally:
            task.cancel()
            sweep.cancel()
            house.cancel()
            if images is not None:
                images.cancel()
            await jobs.aclose()
            await core.aclose()

    app = FastAPI(lifespan=lifespan, **NO_TELEMETRY)
    app.state.frontend = fe
    held = HeldCalls()
    heartbeats = OpenHeartbeats(settings.heartbeats_per_address, settings.heartbeats_total)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if any(b.healthy for b in core.pool.backends) else "no GPU backend",
            "boot_id": BOOT_ID,
            "backend_boot_ids": [(b.last_health or {}).get("boot_id") for b in core.pool.backends],
            # No URLs: this page is public, and the GPU tiers' addresses are not.
            "backends": [{"healthy": b.healthy, "outstanding": b.outstanding} for b in core.pool.backends],
            # requests in flight here: on their way to a GPU tier, or waiting at the door
            # (held: of those waiting, the REST calls held before Gradio, by the door's middleware)
            "door": {"inside": core.door.inside, "waiting": core.door.waiting, "held": held.waiting},
            # open pages (Gradio heartbeat streams) and the sessions whose Gradio state is kept
            "pages": {"open": heartbeats.open, "sessions": session_count(blocks)},
        }

    app.include_router(embed_routes())  # before the mount at "/", which catches everything after it
    # the app's own Blocks, its GPU events forwarded
    app_services.register(AppFrontend(fe))  # the app's CPU events reach this frontend
    blocks = load_app(served)
    endpoints = fe.endpoints = gpu_endpoints(blocks)
    forward_gpu_events(
        endpoints,
        fe.follow_call,
        validator=lambda endpoint: gradio_validator(endpoint, settings.max_file_bytes),
        tells_status=lambda endpoint: tells_status(endpoint.api_name),
    )
    blocks.max_threads = settings.max_threads
    queue = getattr(blocks, "_queue", None)  # the developer's queue settings stay
    blocks.queue(
        max_size=getattr(queue, "max_size", None),
        default_concurrency_limit=getattr(queue, "default_concurrency_limit", "not_set"),
    )
    by_name = {e.api_name: e for e in endpoints}
    if not settings.app and "generate" in by_name:  # the built-in app's: OpenAI's images API over its generate
        app.include_router(openai_routes(core, by_name["generate"]))  # /v1/images/generations, /v1/models

    def is_request(api_name: str, values: object) -> bool:
        """Whether a REST call is a valid one, which the door's middleware holds before Gradio:
        by the app's own validation (``api/validation.py``)."""
        return is_valid_call(by_name[api_name], values, settings.max_file_bytes)

    jobs = JobsService(core, endpoints)
    app.include_router(jobs.router)  # /v1/jobs (durable jobs, webhooks) and /v1/openapi.json
    hold_sessions(blocks, 2 * settings.max_threads)  # every request in flight is a session
    bound_analytics(blocks)
    bound_session_states(blocks, settings.heartbeats_total)
    app = gr.mount_gradio_app(
        app,
        blocks,
        path="",
        ssr_mode=False,
        show_error=True,
        mcp_server=settings.mcp,
        head=DEV_RELOAD_SCRIPT if settings.dev_reload else None,
        app_kwargs=dict(NO_TELEMETRY),
        max_file_size=settings.max_file_bytes if settings.app else None,
    )
    app.add_middleware(  # innermost: behind CORS, so a refusal still carries CORS headers
        DoorMiddleware,
        door=core.door,
        identify=core.identity,
        join=core.join_door,
        is_request=is_request,
        seconds_per_job=lambda: core.seconds_per_job,
        api_names=list(by_name),  # the app's GPU events
        held=held,
        tells_status=tells_status,
    )
    app.add_middleware(
        HeartbeatCap,
        blocks=blocks,
        streams=heartbeats,
        address=lambda scope: core.resolver.address(Request(scope).headers, (scope.get("client") or (None,))[0]),
    )
    app.add_middleware(
        GradioGuard,
        blocks=blocks,
        body_limits={"/gradio_api/mcp": MCP_MAX_BODY_BYTES, **jobs.body_limits},
        json_limits_by_path=jobs.json_limits,
        refusal_bodies={} if settings.app else dict.fromkeys(OPENAI_PATHS, openai_refusal),
        held_events=held.__contains__,
        uploads=bool(settings.app),
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origin_list,
        allow_credentials=True,
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
    )
    app.add_middleware(
        SessionCookieMiddleware,
        cookies=core.cookies,
        secure=settings.cookie_secure,
        trust_forwarded_proto=settings.trusted_proxies > 0,
    )
    if settings.mcp:  # the outermost: it must see the cookie middleware's Set-Cookie
        app.add_middleware(McpLoopback, blocks=blocks, resolver=core.resolver, stamps=core.stamps)
    return app


def create_app() -> FastAPI:
    """App factory for uvicorn (``deploy/serve.py``): settings from the environment."""
    # The images it saves (and deletes after SPLITSPACE_JOB_TTL_S) are in a cache of its own.
    use_own_cache("frontend")
    return build_app(Settings())
