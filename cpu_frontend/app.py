"""The CPU tier: the public Gradio UI and API, thin wiring over session/ and the transport.

Every request is resolved to an identity (API key, session cookie, address),
validated, checked against the client's in-flight cap, and forwarded with a
freshly minted identity token and the caller's ``x-ip-token``, as per-call
headers. With ``SPLITSPACE_APP`` the page and API are the developer's own Blocks
instead of the built-in page; each ``@splitspace.gpu`` event is forwarded the same
way (``ui/app_events.py``, :meth:`Frontend.follow_call`), every other runs here.
The handlers are async generators with no concurrency limit, so the
frontend has no first-in-first-out stage, and a caller who goes away closes
the stream to the GPU tier, which drops the queued job.
"""

# No `from __future__ import annotations` here: Gradio evaluates the handlers' type hints
# on every call, and string annotations make that an eval each time.
import asyncio
import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from fastapi import FastAPI
from gradio import processing_utils
from gradio import utils as gr_utils
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from splitspace.cpu_frontend.api import gradio_tuning
from splitspace.cpu_frontend.api.mcp_loopback import McpLoopback
from splitspace.cpu_frontend.api.openai_images import OPENAI_PATHS, openai_refusal, openai_routes
from splitspace.cpu_frontend.api.validation import gradio_validator, validate_call
from splitspace.cpu_frontend.door.door import FairDoor, Place
from splitspace.cpu_frontend.door.door_middleware import DOOR_PASS_HEADER, DoorMiddleware, HeldCalls
from splitspace.cpu_frontend.door.inflight_ledger import open_ledger
from splitspace.cpu_frontend.door.limits import InflightCaps
from splitspace.cpu_frontend.door.status_feed import Told, status_for_api, wait_turn
from splitspace.cpu_frontend.hop.backends import BackendPool
from splitspace.cpu_frontend.hop.hub_auth import backend_auth_headers
from splitspace.cpu_frontend.hop.transport import CALLS_NEED_DIRECT, Transport
from splitspace.cpu_frontend.jobs.routes import JobsService
from splitspace.cpu_frontend.ui.app_events import forward_gpu_events
from splitspace.cpu_frontend.ui.embed import embed_routes
from splitspace.cpu_frontend.ui.page import LiveModel, build_page
from splitspace.session import (
    ApiKeyring,
    Identity,
    IdentityResolver,
    IdentityTokens,
    SessionCookieMiddleware,
    SessionCookies,
)
from splitspace.session.address import AddressPolicy
from splitspace.session.caller import CallerStamps
from splitspace.session.token import HEALTH, STANDING, infer_purpose
from splitspace.shared.app.files import BadFile, FileTooLarge, carries_files, inline_files, outline_files
from splitspace.shared.app.loader import GpuEndpoint, gpu_endpoints, load_app
from splitspace.shared.app.processing import input_label
from splitspace.shared.config.quota_watch import QuotaWatcher
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.calls import Call, CallResult, Partial
from splitspace.shared.contract.errors import GpuFailed, SplitspaceError, ValidationFailed
from splitspace.shared.contract.headers import IDENTITY_HEADER, IP_TOKEN_HEADER
from splitspace.shared.contract.hop import Result, Status
from splitspace.shared.contract.schema import REQUEST_FIELDS, request_from_dict, validate_request
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
from splitspace.shared.gradio.gradio_signature import request_handler
from splitspace.shared.http.guard import GradioGuard
from splitspace.shared.http.server import NO_TELEMETRY

if TYPE_CHECKING:
    from splitspace.cpu_frontend.ui.ui_text import Refusal

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
FRONTEND_IDENTITY = Identity("frontend", "address", "anonymous", "frontend")
"""Who the frontend is when it asks a GPU tier for its live caps (health checks)."""
MCP_MAX_BODY_BYTES = 64 * 1024
IMAGE_NAME = "image.png"
"""The file name of each image :meth:`Frontend.save_image` writes."""
IMAGE_SWEEP_S = 60.0
"""How often images older than ``SPLITSPACE_JOB_TTL_S`` are deleted (:func:`expire_images`)."""


def image_output(path: str) -> dict[str, Any]:
    """The Image output as Gradio sends it (what ``gr.Image.postprocess`` makes of a PNG
    path). The events run with ``postprocess=False``: for outputs that are already
    final (a PNG file and a dict), Gradio's postprocess would only add two thread hops
    and a second pass over the file per call."""
    return {"path": path, "orig_name": "image.png", "mime_type": "image/png", "meta": {"_type": "gradio.FileData"}}


def to_gradio_error(exc: SplitspaceError) -> gr.Error:
    return gr.Error(exc.user_text(), title=exc.title, print_exception=False)


def build_transports(settings: Settings) -> list[Transport]:
    """One transport per GPU tier URL, of the configured kind (settings read here, at the edge)."""
    auth = backend_auth_headers(settings.hf_token.get_secret_value() if settings.hf_token else None)
    kw: dict[str, Any] = {"timeout_s": settings.backend_timeout_s, "auth_headers": auth}
    if settings.transport == "gradio_client":
        from splitspace.cpu_frontend.hop.gradio_client_transport import GradioClientTransport

        return [GradioClientTransport(u, **kw) for u in settings.backend_urls]
    if settings.transport == "httpx":
        from splitspace.cpu_frontend.hop.httpx_transport import HttpxTransport

        return [HttpxTransport(u, **kw) for u in settings.backend_urls]
    from splitspace.cpu_frontend.hop.direct_transport import DirectTransport

    return [DirectTransport(u, **kw) for u in settings.backend_urls]


class Frontend:
    """Everything the CPU tier holds, built once from settings, and its two handlers."""

    def __init__(self, settings: Settings, transports: list[Transport] | None = None) -> None:
        if not settings.secrets:
            raise ValueError("SPLITSPACE_SECRET is required (the tiers' shared secret)")
        self.settings = settings
        self.tokens = IdentityTokens(settings.secrets)
        self.cookies = SessionCookies(settings.secrets)
        self.watcher = QuotaWatcher(settings.quotas, on_change=self._on_quotas)
        self.stamps = CallerStamps(settings.secrets)
        self.resolver = IdentityResolver(
            cookies=self.cookies,
            keyring=ApiKeyring(self.watcher.current.keys),
            addresses=AddressPolicy(
                trusted_proxies=settings.trusted_proxies,
                trusted_networks=settings.trusted_proxy_cidrs,
                ipv6_prefix=settings.ipv6_prefix,
            ),
            stamps=self.stamps,
        )
        self.caps = InflightCaps(
            lambda: self.watcher.current, idle_s=settings.idle_s, max_idle=settings.max_idle_clients
        )
        self.pool = BackendPool(
            transports or build_transports(settings),
            health_headers=lambda: {IDENTITY_HEADER: self.tokens.mint(FRONTEND_IDENTITY, HEALTH)},
            on_health=lambda doc: self.caps.learn_all(doc.get("caps") or {}),
        )
        self.door = FairDoor(per_flow=settings.door_per_flow, total=settings.door_total)
        self.ledger = open_ledger(settings)
        """The in-flight counts shared by every frontend (a no-op without Redis)."""
        self.seconds_per_job = 1.0
        """Measured GPU seconds per job (smoothed), for the ETA of requests waiting at the door."""
        self.model = LiveModel(self.pool.health)
        self.generate_api = request_handler(
            self.generate,
            "generate",
            "Generate one image; streams its place in line, then returns the image and its info.",
        )
        """``/generate`` as Gradio sees it: the request's fields as parameters."""
        self.cache_dir = gr_utils.get_upload_folder()

    def _on_quotas(self, config: Any) -> None:
        self.resolver.keyring = ApiKeyring(config.keys)

    def identity(self, request: gr.Request | Request | None) -> Identity:
        """Who a caller is: a handler's (a ``gr.Request``) or the door's middleware's (a
        Starlette ``Request``), by the same headers, cookies and peer address."""
        if request is None:
            raise SplitspaceError("no request context", title="Error")
        peer = request.client.host if request.client else None
        return self.resolver.resolve(request.headers, request.cookies, peer)

    def forward_headers(self, identity: Identity, request: gr.Request, purpose: str) -> dict[str, str]:
        """A fresh identity token for this one call, and the visitor's ZeroGPU token."""
        headers = {IDENTITY_HEADER: self.tokens.mint(identity, purpose)}
        ip_token = request.headers.get(IP_TOKEN_HEADER)
        if ip_token:
            headers[IP_TOKEN_HEADER] = ip_token
        return headers

    async def join_door(self, identity: Identity, parked: bool = False) -> Place:
        """Join the client's line at the door, within its in-flight cap counted here and,
        with Redis, across every frontend (``inflight_ledger.py``); raises Queue full (or
        Service unavailable, Redis down in ``closed`` mode). The one way in, for the
        door's middleware and the handler. ``parked``: counted, not yet in line
        (``FairDoor.join``)."""
        flow, terms = identity.flow_id, self.caps.terms(identity)
        self.door.check_cap(flow, terms.cap)
        hold = await self.ledger.acquire(flow, terms.cap, self.door.count(flow))
        try:  # again: others may have joined meanwhile
            place = self.door.join(flow, terms.cap, terms.weight, room=terms.running, parked=parked)
        except BaseException:
            self.ledger.release(hold)
            raise
        if hold is not None:
            place.on_leave = lambda: self.ledger.release(hold)
        return place

    def is_request(self, values: Any) -> bool:
        """Whether a REST call's fields (a list in ``REQUEST_FIELDS`` order, or by name) make
        a valid request: the door's middleware holds only those, and passes anything else
        on to the handler, which names what is wrong."""
        if isinstance(values, list) and len(values) == len(REQUEST_FIELDS):
            values = dict(zip(REQUEST_FIELDS, values, strict=True))
        if not isinstance(values, dict):
            return False
        try:
            request_from_dict(values, self.settings.limits)
        except SplitspaceError:
            return False
        return True

    def save_image(self, png: bytes) -> str:
        """The PNG in Gradio's cache, at a path named by its hash (as ``save_bytes_to_cache``),
        written whole: a temporary file renamed, so that an identical image (same seed) saved
        meanwhile never lets a reader of this path see a truncated file."""
        folder = Path(self.cache_dir) / processing_utils.hash_bytes(png)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".part", delete=False) as tmp:
            tmp.write(png)
        path = folder / IMAGE_NAME
        os.replace(tmp.name, path)
        return str(path.resolve())

    async def generate(
        self, values: dict[str, Any], request: gr.Request | None
    ) -> AsyncGenerator[tuple[dict | None, dict], None]:
        """``/generate``: validate, cap, forward; stream status, then the image and its info."""
        try:
            identity = self.identity(request)
            assert request is not None  # (identity() refuses a call without one)
            req = validate_request(**values, limits=self.settings.limits)
            flow = identity.flow_id
            result: Result | None = None
            # A REST call held by the door's middleware arrives with its place; any other
            # joins its flow's line here.
            place = self.door.take(request.headers.get(DOOR_PASS_HEADER), flow) or await self.join_door(identity)
            told = Told(place.told)
            try:
                # Gradio closes this generator at its next yield when the caller goes
                # away: a request waiting at the door then leaves its line at once.
                async for status in wait_turn(place, told, lambda: self.seconds_per_job):
                    yield None, status_for_api(status)
                # aclosing: the stream to the GPU tier must close when this generator
                # does (the GPU tier then drops the queued job), not at GC.
                updates = self.pool.stream(req, self.forward_headers(identity, request, infer_purpose(req.digest())))
                async with contextlib.aclosing(updates):
                    async for update in updates:
                        self.caps.learn(identity, update.cap)
                        if isinstance(update, Result):
                            result = update
                            break
                        # news, or the last place again now and then: a yield is how Gradio
                        # notices a caller who left (the GPU tier then drops the job)
                        news = told.next(update)
                        if news is not None:
                            yield None, status_for_api(news)
            finally:
                # The door's place is given back as soon as the GPU tier has answered: what
                # is left (saving the image, Gradio sending it) no longer holds up the
                # client's next.
                place.leave()
            if result is not None:
                self.seconds_per_job += 0.1 * (result.info.gpu_s - self.seconds_per_job)
                # on a worker thread: a file write on the event loop held up every other caller
                path = await asyncio.to_thread(self.save_image, result.image_png)
                yield image_output(path), result.info.to_dict()
        except SplitspaceError as exc:
            raise to_gradio_error(exc) from None

    async def follow_call(
        self, endpoint: GpuEndpoint, payloads: list[Any], request: gr.Request | None
    ) -> AsyncGenerator[Status | list[Any], None]:
        """A call of the developer's GPU function (``ui/app_events.py``): validate, join the
        door, forward; its statuses (its place at the door, then at the GPU tier), then its
        outputs (one payload per output component, files in this tier's cache): a
        generator's each yield as it arrives (a Partial), its last as the result (not twice)."""
        try:
            identity = self.identity(request)
            assert request is not None  # (identity() refuses a call without one)
            max_bytes = self.settings.max_file_bytes
            # one trip off the loop: the checks (with a validator=, an image decoded), each file read and hashed
            call, digest = await asyncio.to_thread(_checked_call, endpoint, payloads, max_bytes)
            result: CallResult | None = None
            last_partial: list[Any] | None = None
            place = self.door.take(request.headers.get(DOOR_PASS_HEADER), identity.flow_id) or await self.join_door(
                identity
            )
            told = Told(place.told)
            try:
                async for status in wait_turn(place, told, lambda: self.seconds_per_job):
                    yield status
                # aclosing: the call to the GPU tier closes when this generator does (the
                # caller left: the GPU tier drops the queued job, or stops its stream), not at GC.
                updates = self.pool.call(call, self.forward_headers(identity, request, infer_purpose(digest)))
                async with contextlib.aclosing(updates):
                    async for update in updates:
                        if isinstance(update, CallResult):
                            self.caps.learn(identity, update.cap)
                            result = update
                            break
                        if isinstance(update, Partial):  # a generator's yield: it replaces the outputs
                            last_partial = update.data
                            yield await self._landed(update.data, max_bytes)
                        elif isinstance(update, Status):
                            self.caps.learn(identity, update.cap)
                            news = told.next(update)
                            if news is not None and last_partial is None:  # (a stream's heartbeats say nothing)
                                yield news
            finally:
                place.leave()  # the GPU tier has answered: the client's next may go
            if result is not None:
                self.seconds_per_job += 0.1 * (result.info.gpu_s - self.seconds_per_job)
                if result.data != last_partial:  # a stream's last yield came as a Partial already
                    yield await self._landed(result.data, max_bytes)
        except SplitspaceError as exc:
            raise to_gradio_error(exc) from None

    async def _landed(self, data: list[Any], max_bytes: int) -> list[Any]:
        """Payloads from the GPU tier with their files written into this tier's cache (in a
        thread: they may be megabytes; text needs no trip there)."""
        if not carries_files(data):
            return data
        try:
            landed: list[Any] = await asyncio.to_thread(outline_files, data, self.cache_dir, max_bytes=max_bytes)
        except (FileTooLarge, BadFile) as exc:  # (the tiers disagree on SPLITSPACE_MAX_FILE_BYTES)
            raise GpuFailed(f"an output could not be received: {exc}") from None
        return landed

    async def quota(self, request: gr.Request = None) -> dict:  # type: ignore[assignment]
        """``/quota``: the caller's own standing, as the GPU tier counts it."""
        try:
            identity = self.identity(request)
            result = await self.pool.standing(self.forward_headers(identity, request, STANDING))
            return {**result, "in_flight_here": self.door.count(identity.flow_id)}
        except SplitspaceError as exc:
            raise to_gradio_error(exc) from None

    # -- UI only: what the page (page.py) needs beyond the API handlers above ----------------
    # The page's Generate button does not call /generate: it follows `generate` through
    # `ui_follow`, so validation, caps and forwarding stay in one place, and it words the
    # statuses and refusals itself (ui_text.py), while API clients keep their dicts.
    @property
    def browser_secret(self) -> str:
        """The key of the page's BrowserState (recent images, kept in the browser)."""
        from splitspace.cpu_frontend.ui.page import browser_state_secret

        return browser_state_secret(self.settings.secrets)

    async def ui_follow(
        self,
        values: dict[str, Any],
        request: gr.Request,
        on_status: "Callable[[dict[str, Any]], bool]",
    ) -> "tuple[dict[str, Any], dict[str, Any]] | Refusal | None":
        """Run ``generate`` for the page: each status dict goes to ``on_status`` (which
        answers False when the tab has gone: the stream to the GPU tier is closed then);
        returns ``(image, info)``, or the refusal as data for the page to word, or None."""
        from splitspace.cpu_frontend.ui.ui_text import Refusal
        from splitspace.shared.contract.errors import (  # (imported here: this block is the page's, kept apart)
            QUEUE_FULL,
            Throttled,
        )

        try:
            updates = self.generate(values, request)
            async with contextlib.aclosing(updates):
                async for image, info in updates:
                    if image is not None:
                        return image, info
                    if not on_status(info):
                        return None
        except gr.Error as exc:
            # generate raises gr.Error "from None": the project's own error is its context.
            cause = exc.__context__
            if not isinstance(cause, SplitspaceError):
                cause = SplitspaceError(str(exc.message), title=exc.title or "Error")
            in_flight, shared = 0, False
            with contextlib.suppress(SplitspaceError):
                identity = self.identity(request)
                in_flight, shared = self.door.count(identity.flow_id), identity.kind != "key"
            if isinstance(cause, Throttled):
                retry = cause.retry_after_s
                if cause.title == QUEUE_FULL:  # a retry needs one of those to finish: about a job's time
                    retry = max(retry, self.seconds_per_job)
                return Refusal(cause.title, cause.reason, retry, in_flight, shared)
            return Refusal(cause.title, cause.message, None, in_flight, shared)
        return None


def _checked_call(endpoint: GpuEndpoint, payloads: list[Any], max_bytes: int) -> tuple[Call, str]:
    """The call these payloads make, checked (``validate_call``), its files carried, and its
    digest (blocking: for a thread)."""
    validate_call(endpoint, payloads, max_bytes)
    call = Call(endpoint.api_name, _carried(endpoint, payloads, max_bytes))
    try:
        return call, call.digest()
    except (TypeError, ValueError):  # NaN, or a gr.State holding what JSON cannot say
        raise ValidationFailed("data", "must be plain JSON (no NaN, infinity or Python objects)") from None


def expire_images(cache_dir: str, age_s: float, now: float | None = None) -> int:
    """Delete the images :meth:`Frontend.save_image` wrote (``<cache>/<hash>/image.png``)
    more than ``age_s`` ago (the same image saved again is written again), and their
    folders; how many. The OpenAI API's ``response_format="url"`` hands out their URLs:
    they live as long as a job's results (``SPLITSPACE_JOB_TTL_S``), not forever."""
    cutoff = (time.time() if now is None else now) - age_s
    gone = 0
    for path in Path(cache_dir).glob(f"*/{IMAGE_NAME}"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                gone += 1
                with contextlib.suppress(OSError):  # (not empty: an identical image being written)
                    path.parent.rmdir()
        except OSError:  # deleted meanwhile
            continue
    return gone


async def expire_images_every(cache_dir: str, age_s: float) -> None:
    """:func:`expire_images` now and then (from the lifespan), off the event loop."""
    while True:
        await asyncio.sleep(min(IMAGE_SWEEP_S, age_s / 2))
        try:
            await asyncio.to_thread(expire_images, cache_dir, age_s)
        except Exception:  # housekeeping must not stop for good
            log.exception("expiring images failed; trying again later")


def _carried(endpoint: GpuEndpoint, payloads: list[Any], max_bytes: int) -> list[Any]:
    """The payloads with their files as bytes (Gradio has moved each upload into this tier's
    cache and checked it); a file over the limit is refused naming its input."""
    carried = []
    for i, (block, payload) in enumerate(zip(endpoint.inputs, payloads, strict=True)):
        try:
            carried.append(inline_files(payload, max_bytes=max_bytes))
        except FileTooLarge as exc:
            raise ValidationFailed(input_label(block, i), str(exc)) from None
    return carried


def build_app(settings: Settings | None = None, transports: list[Transport] | None = None) -> FastAPI:
    settings = settings or Settings()
    gradio_tuning.apply()
    fe = Frontend(settings, transports)
    if settings.app and not all(b.transport.carries_calls for b in fe.pool.backends):
        raise ValueError(CALLS_NEED_DIRECT)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def watch() -> None:
            while True:
                await asyncio.sleep(1.0)
                fe.watcher.check()

        task = asyncio.create_task(watch())
        sweep = asyncio.create_task(sweep_finished_sessions(blocks))
        # the Gradio state of finished calls (shared/gradio/gradio_sessions.py)
        house = asyncio.create_task(every(HOUSEKEEPING_S, lambda: forget_finished_states(blocks, heartbeats.sessions)))
        images = None if settings.app else asyncio.create_task(expire_images_every(fe.cache_dir, settings.job_ttl_s))
        await fe.ledger.start()
        await fe.pool.start()
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
            await fe.pool.aclose()
            await fe.ledger.aclose()

    app = FastAPI(lifespan=lifespan, **NO_TELEMETRY)
    app.state.frontend = fe
    held = HeldCalls()
    heartbeats = OpenHeartbeats(settings.heartbeats_per_address, settings.heartbeats_total)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if any(b.healthy for b in fe.pool.backends) else "no GPU backend",
            "boot_id": BOOT_ID,
            "backend_boot_ids": [(b.last_health or {}).get("boot_id") for b in fe.pool.backends],
            # No URLs: this page is public, and the GPU tiers' addresses are not.
            "backends": [{"healthy": b.healthy, "outstanding": b.outstanding} for b in fe.pool.backends],
            # requests in flight here: on their way to a GPU tier, or waiting at the door
            # (held: of those waiting, the REST calls held before Gradio, by the door's middleware)
            "door": {"inside": fe.door.inside, "waiting": fe.door.waiting, "held": held.waiting},
            # open pages (Gradio heartbeat streams) and the sessions whose Gradio state is kept
            "pages": {"open": heartbeats.open, "sessions": session_count(blocks)},
        }

    app.include_router(embed_routes())  # before the mount at "/", which catches everything after it
    endpoints: list[GpuEndpoint] = []
    if settings.app:  # the developer's own Blocks, its GPU events forwarded
        blocks = load_app(settings.app)
        endpoints = gpu_endpoints(blocks)
        forward_gpu_events(
            endpoints, fe.follow_call, validator=lambda endpoint: gradio_validator(endpoint, settings.max_file_bytes)
        )
        blocks.max_threads = settings.max_threads
        queue = getattr(blocks, "_queue", None)  # the developer's queue settings stay
        blocks.queue(
            max_size=getattr(queue, "max_size", None),
            default_concurrency_limit=getattr(queue, "default_concurrency_limit", "not_set"),
        )
    else:
        app.include_router(openai_routes(fe))  # /v1/images/generations, /v1/models (OpenAI's images API)
        blocks = build_page(fe.model, settings.limits, fe)
        blocks.max_threads = settings.max_threads
        blocks.queue(default_concurrency_limit=None)
    jobs = JobsService(fe, endpoints)
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
        door=fe.door,
        identify=fe.identity,
        join=fe.join_door,
        is_request=fe.is_request,
        seconds_per_job=lambda: fe.seconds_per_job,
        api_names=[] if settings.app else ["generate"],  # a GPU event of an app joins the door in its handler
        held=held,
    )
    app.add_middleware(
        HeartbeatCap,
        blocks=blocks,
        streams=heartbeats,
        address=lambda scope: fe.resolver.address(Request(scope).headers, (scope.get("client") or (None,))[0]),
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
        cookies=fe.cookies,
        secure=settings.cookie_secure,
        trust_forwarded_proto=settings.trusted_proxies > 0,
    )
    if settings.mcp:  # the outermost: it must see the cookie middleware's Set-Cookie
        app.add_middleware(McpLoopback, blocks=blocks, resolver=fe.resolver, stamps=fe.stamps)
    return app


def create_app() -> FastAPI:
    """App factory for uvicorn (``deploy/serve.py``): settings from the environment."""
    return build_app(Settings())
