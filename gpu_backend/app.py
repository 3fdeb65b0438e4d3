"""The GPU tier: a thin Gradio app over the runner, the scheduler and the model.

Wiring only. Calls come in through the direct route (``direct_route.py``,
``/splitspace/v1/call``): a call of one of the app's ``@splitspace.gpu`` functions (the
developer's ``SPLITSPACE_APP``, else the built-in text-to-image app, whose ``generate``
reads the model this tier holds), through one fair queue. The route is a thin adapter
over :class:`~gpu_backend.serving.service.CallService` (verify, validate, admit,
follow, map failures); admission, fair order and execution are the runner's.

The Gradio app itself is a page saying the tier is not for the public, with no endpoint:
the frontend's transport reads the caller's standing from the direct route too
(``/splitspace/v1/standing``) and the tier's state from ``/health``. Gradio's own routes
stay behind the guard (``shared/http/guard.py``), and ``queue(api_open=False)`` closes
the queue-skipping ``/gradio_api/run/`` route.
"""

# No `from __future__ import annotations` here: Gradio evaluates the handlers' type hints
# on every call, and string annotations make that an eval each time.
import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import gradio as gr
import spaces
from fastapi import APIRouter, Body, FastAPI, HTTPException, Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from splitspace.builtin import APP as BUILTIN_APP
from splitspace.builtin import is_builtin
from splitspace.gpu_backend.admission.limits import Overrides, limits_function
from splitspace.gpu_backend.admission.runner import GpuRunner, client_ref
from splitspace.gpu_backend.admission.scheduler import FairScheduler
from splitspace.gpu_backend.ops.admin import admin_router
from splitspace.gpu_backend.ops.dashboard import DASHBOARD_PATH
from splitspace.gpu_backend.ops.metrics import CONTENT_TYPE, GpuMetrics
from splitspace.gpu_backend.ops.operator_guard import OperatorGuard
from splitspace.gpu_backend.ops.operator_sessions import GuessThrottle
from splitspace.gpu_backend.serving.direct_route import STANDING_PATH, DirectRoutes
from splitspace.gpu_backend.serving.service import CallService
from splitspace.gpu_backend.stores.global_limits import GlobalLimits, local_limits
from splitspace.gpu_backend.stores.resilient_store import ResilientStore, open_store
from splitspace.gpu_backend.stores.usage import MemoryUsageStore
from splitspace.gpu_backend.stores.write_behind import SqliteUsageStore, WriteBehindStore
from splitspace.gpu_backend.workload import gpu
from splitspace.gpu_backend.workload.app_functions import AppFunction, app_functions
from splitspace.gpu_backend.workload.model import CompileConfig, ModelExecutor
from splitspace.session.address import AddressPolicy
from splitspace.session.identity import Identity
from splitspace.session.token import HEALTH, IdentityTokens
from splitspace.shared.app.files import expire_files_every, use_own_cache
from splitspace.shared.app.loader import gpu_endpoints, load_app
from splitspace.shared.config.quota_watch import QuotaWatcher
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.admin_api import ClientStats, ModelChange, QuotaStatus
from splitspace.shared.contract.calls import CALL_PATH, call_body_limit
from splitspace.shared.contract.errors import SplitspaceError
from splitspace.shared.contract.headers import IDENTITY_HEADER
from splitspace.shared.contract.quotas import QuotaConfig
from splitspace.shared.gradio.gradio_queue import bound_analytics, sweep_finished_sessions
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
from splitspace.shared.http.json_limits import DEFAULT_LIMITS
from splitspace.shared.http.server import NO_TELEMETRY

log = logging.getLogger("splitspace.gpu")
T = TypeVar("T")


BOOT_ID = uuid.uuid4().hex
"""Changes whenever this process (re)starts (``splitspace dev --reload`` reloads the page then)."""


class GpuTier:
    """Everything the GPU tier holds, built once from settings, each part given what it
    calls at construction (nothing is wired in afterwards)."""

    def __init__(self, settings: Settings, executor: ModelExecutor | None = None) -> None:
        self.settings = settings
        self.tokens = IdentityTokens(settings.secrets)
        if not self.tokens.configured:
            log.warning("no SPLITSPACE_SECRET: the GPU tier refuses every call")
        # The loaded model lives in gpu.py (a ZeroGPU worker reaches it there), nowhere else.
        self.compile = CompileConfig(settings.compile_width, settings.compile_height) if settings.compile else None
        self.functions: dict[str, AppFunction] = {}
        """The app's GPU functions: the developer's (``settings.app``), else the built-in app's."""
        self.holds_model = not settings.app or is_builtin(settings.app)
        """The tier holds the project's model (``gpu.py``): the built-in's, changed live by operators."""
        if self.holds_model:
            if executor is not None:
                gpu.set_executor(executor)
            else:
                gpu.load_model(settings.model, compile_unet=self.compile)
        self.cache_dir = gr.utils.get_upload_folder()
        """Where the calls' files land and their outputs are written (Gradio's cache), for the call alone."""
        served = settings.app or BUILTIN_APP  # no app: the built-in one
        endpoints = gpu_endpoints(load_app(served))
        self.functions = app_functions(endpoints, cache_dir=self.cache_dir, max_file_bytes=settings.max_file_bytes)
        log.info("serving %s: %s", served, ", ".join(self.functions) or "no GPU functions")
        self._model_lock = asyncio.Lock()
        # A change of limits (an operator's override, a quota file edit) may let a waiting job
        # start now: dispatch then, not at the next arrival.
        self.watcher = QuotaWatcher(settings.quotas, on_change=self._quotas_changed)
        self.global_limits: GlobalLimits | None = None
        if settings.redis_url is None:
            # Usage in memory, written to the file soon after: no disk I/O under the lock
            # that the GPU thread shares with admission (write_behind.py).
            self.store: WriteBehindStore | ResilientStore = WriteBehindStore(SqliteUsageStore(settings.state_path))
            self.overrides = Overrides(self.store, on_change=self.limits_changed)
            limits = limits_function(self.quota_config, self.overrides)
            self._memory_stores: list[MemoryUsageStore | WriteBehindStore] = [self.store]
            self.scheduler = FairScheduler(
                clock=time.time,
                limits=limits,
                store=self.store,
                capacity=1,
                idle_s=settings.idle_s,
                max_idle=settings.max_idle_clients,
            )
        else:
            # Every replica's limits in Redis, checked outside the runner's lock
            # (global_limits.py); the local scheduler keeps fair order among this tier's jobs.
            self.store = open_store(
                redis_url=settings.redis_url.get_secret_value(),
                sqlite_path=settings.state_path,
                failure=settings.redis_failure,
                replicas=settings.replicas,
            )
            assert isinstance(self.store, ResilientStore)
            self.overrides = Overrides(self.store, on_change=self.limits_changed)
            limits = limits_function(self.quota_config, self.overrides)
            self.global_limits = GlobalLimits(
                store=self.store,
                limits=limits,
                lease_s=settings.lease_s,
                on_retry=self.dispatch,
                on_tick=self.overrides.refresh,
            )
            local = MemoryUsageStore()
            self._memory_stores = [self.store.fallback, local]
            self.scheduler = FairScheduler(
                clock=time.time,
                limits=local_limits(limits),
                store=local,
                capacity=1,
                held=self.global_limits.held,
                service_floor=self.global_limits.service_floor,
                idle_s=settings.idle_s,
                max_idle=settings.max_idle_clients,
            )
        self.metrics = GpuMetrics(self.depth_by_tier)
        self.runner = GpuRunner(
            self.scheduler,
            batch_wait_s=settings.batch_wait_ms / 1000,
            on_zerogpu=bool(spaces.config.Config.zero_gpu),
            clock=time.time,
            on_event=self.metrics.on_event,
            gate=self.global_limits,
        )
        self.service = CallService(
            tokens=self.tokens,
            runner=self.runner,
            standing=self.standing,
            on_call=self.metrics.calls.inc,
            on_refused=self.metrics.refuse,
            global_limits=self.global_limits,
            functions=self.functions,
            on_function_call=self._function_called,
        )

    def quota_config(self) -> QuotaConfig:
        """The quota file in force."""
        return self.watcher.current

    def _quotas_changed(self, config: QuotaConfig) -> None:
        self.limits_changed(None)

    def _function_called(self, name: str) -> None:
        self.metrics.function_calls.labels(name).inc()

    def dispatch(self) -> None:
        """Start what may start now (the global limits retry a refused start through this)."""
        self.runner.dispatch()

    def depth_by_tier(self) -> dict[str, tuple[int, int]]:
        """Queued and running jobs per tier (the metrics' gauges)."""
        return self.with_scheduler(FairScheduler.depth_by_tier)

    def limits_changed(self, client_id: str | None) -> None:
        """One client's limits (or everyone's, ``None``) changed: positions follow the new
        weights at once, and a job that may start now starts."""
        with self.runner.locked() as scheduler:
            scheduler.refresh_limits(client_id)
        self.runner.dispatch()

    async def change_model(self, spec: str) -> ModelChange:
        """Load another model without a restart: calls in flight finish on the old one,
        new ones queue (none is refused) and run on the new one; the built-in app reads
        the model, its presets and its batch cap at each call (``gpu.current_executor``,
        ``gpu.batch_cap``). A spec that fails to load leaves the old model in place and
        raises ValueError."""
        if not self.holds_model:
            raise ValueError(f"this GPU tier serves {self.settings.app}, not a model")
        async with self._model_lock:
            previous = gpu.current_executor().name

            def change() -> None:
                gpu.set_executor(ModelExecutor.from_spec(spec, compile_unet=self.compile))

            await asyncio.to_thread(self.runner.swap, change)
            log.info("model changed from %s to %s", previous, spec)
            return {"model": gpu.current_executor().name, "previous": previous}

    def store_forget_expired(self) -> None:
        """Drop the usage windows, leases and service that ended from the in-memory stores
        (the housekeeping of ``build_app``'s lifespan; nothing live is lost)."""
        now = time.time()
        for store in self._memory_stores:
            store.forget_expired(now)

    def keep_house(self) -> None:
        """What idle clients and ended windows left behind (scheduler.py, the stores)."""
        self.with_scheduler(FairScheduler.forget_idle)
        self.store_forget_expired()

    async def watch_quotas(self) -> None:
        """Reload the quota file when it changes (runs for the app's lifetime)."""
        while True:
            await asyncio.sleep(1.0)
            self.watcher.check()

    def quota_status(self) -> QuotaStatus:
        """The quota file and its last refusal, for operators."""
        return {
            "path": str(self.watcher.path) if self.watcher.path else None,
            "last_error": self.watcher.last_error,
        }

    async def aclose(self) -> None:
        """Stop the GPU threads, then the global limits and the stores."""
        self.runner.close()
        if self.global_limits is not None:
            self.global_limits.close()
            await self.global_limits.store.aclose()
        self.store.close()

    def with_scheduler(self, read: Callable[[FairScheduler], T]) -> T:
        """Read the scheduler under the runner's lock (the GPU threads change it too)."""
        with self.runner.locked() as scheduler:
            return read(scheduler)

    def standing(self, identity: Identity) -> dict[str, Any]:
        """The caller's own quota standing."""
        ref = client_ref(identity)
        stats: ClientStats = self.with_scheduler(lambda s: s.client_stats(ref))
        if self.global_limits is not None:
            stats = self.global_limits.global_stats(stats, ref)
        stats["tier"] = self.watcher.current.tier_name(
            identity.client_id, identity.tier, self.overrides.get(identity.client_id)
        )
        stats["client"] = identity.client_id
        return dict(stats)

    def live_caps(self) -> dict[str, int]:
        """max_running + max_queued of every client with an override, as the frontend
        counts them (operators' overrides live here, not in the frontend's quota file)."""
        config = self.watcher.current
        ids = set(config.clients) | set(self.overrides.all())
        caps = {}
        for client_id in ids:
            if client_id.startswith("session:"):
                continue  # the frontend caps sessions by address
            limits = config.limits_for(client_id, config.key_tier(client_id), self.overrides.get(client_id))
            caps[client_id] = limits.max_running + limits.max_queued
        return caps

    def health(self, token: str | None = None) -> dict[str, Any]:
        """The health document; with a frontend's identity token (it holds the secret), the
        live in-flight caps too."""
        depth = self.depth_by_tier()
        doc: dict[str, Any] = {"status": "ok", "boot_id": BOOT_ID, "functions": sorted(self.functions)}
        if self.holds_model:
            ex = gpu.current_executor()
            doc.update(
                model=ex.name,
                placeholder_model=ex.is_placeholder,
                defaults={"steps": ex.preset.steps, "guidance_scale": ex.preset.guidance_scale},
            )
        doc.update(queued=sum(q for q, _ in depth.values()), running=sum(r for _, r in depth.values()))
        if token:
            try:
                self.tokens.verify(token).require(HEALTH)
            except SplitspaceError:
                return doc
            doc["caps"] = self.live_caps()
        return doc


def build_blocks() -> gr.Blocks:
    """The GPU tier's Gradio app: a page saying who the tier is for, and no endpoint (calls
    and the caller's standing come through the direct route, ``direct_route.py``)."""
    with gr.Blocks(title="splitspace GPU tier") as blocks:
        gr.Markdown("splitspace GPU tier. Not for the public: the frontend is its only caller.")
    return blocks


def model_routes(router: APIRouter, tier: GpuTier) -> None:
    """``/admin/model``: which model is loaded, and changing it live."""

    @router.get("/model")
    async def show_model() -> dict[str, Any]:
        if not tier.holds_model:
            return {"model": None, "app": tier.settings.app, "functions": sorted(tier.functions)}
        return {"model": gpu.current_executor().name}

    @router.put("/model", response_model=None)
    async def set_model(body: dict[str, Any] = Body(...)) -> ModelChange:
        spec = body.get("model")
        if not isinstance(spec, str) or not spec.strip():
            raise HTTPException(422, "model: give a model spec (tiny, sleep:MS, or a diffusers id or path)")
        try:
            return await tier.change_model(spec.strip())
        except ValueError as exc:
            raise HTTPException(422, f"model: {exc}") from None


def build_app(settings: Settings | None = None, executor: ModelExecutor | None = None) -> FastAPI:
    settings = settings or Settings()
    tier = GpuTier(settings, executor)

    def keep_house() -> None:
        """What finished calls and idle clients left behind (gradio_sessions.py, the tier)."""
        forget_finished_states(blocks, heartbeats.sessions)
        tier.keep_house()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(tier.watch_quotas())
        sweep = asyncio.create_task(sweep_finished_sessions(blocks))
        house = asyncio.create_task(every(HOUSEKEEPING_S, keep_house))
        # the files of finished calls (landed inputs, outputs once carried back as bytes)
        files = asyncio.create_task(expire_files_every(tier.cache_dir, "*/*", settings.gpu_files_ttl_s))
        try:
            yield
        finally:
            for background in (task, sweep, house, files):
                background.cancel()
            await tier.aclose()

    app = FastAPI(lifespan=lifespan, **NO_TELEMETRY)
    app.state.tier = tier
    heartbeats = OpenHeartbeats(settings.heartbeats_per_address, settings.heartbeats_total)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        # a frontend (it holds the secret) also learns the live in-flight caps
        doc = tier.health(request.headers.get(IDENTITY_HEADER))
        return {**doc, "pages": {"open": heartbeats.open, "sessions": session_count(blocks)}}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(tier.metrics.render(), media_type=CONTENT_TYPE)

    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    app.include_router(
        admin_router(
            token=admin_token,
            read=tier.with_scheduler,
            store=tier.store,
            overrides=tier.overrides,
            config=tier.quota_config,
            global_limits=tier.global_limits,
            quota_status=tier.quota_status,
            extra_routes=lambda router: model_routes(router, tier),
        )
    )

    if admin_token:  # the operators' dashboard at /admin/ui: same token, through a login
        from splitspace.gpu_backend.ops.dashboard import mount_dashboard

        app = mount_dashboard(app, tier, admin_token)

    call_limit = call_body_limit(settings.max_file_bytes)
    direct = DirectRoutes(
        tier.service,
        max_call_bytes=call_limit,
        max_file_bytes=settings.max_file_bytes,
        # a call's text inputs may be as long as its files (as when files crossed inside the JSON)
        call_limits=dataclasses.replace(DEFAULT_LIMITS, max_string_bytes=call_limit),
    )
    for path in (STANDING_PATH, CALL_PATH):  # before the mount at "/", which catches everything after
        app.router.routes.append(Route(path, direct, methods=["POST"]))

    blocks = build_blocks()
    blocks.queue(api_open=False, max_size=settings.queue_max_size, default_concurrency_limit=None)
    bound_analytics(blocks)
    bound_session_states(blocks, settings.heartbeats_total)
    app = gr.mount_gradio_app(app, blocks, path="", ssr_mode=False, footer_links=["api"], app_kwargs=dict(NO_TELEMETRY))
    addresses = AddressPolicy(
        trusted_proxies=settings.trusted_proxies,
        trusted_networks=settings.trusted_proxy_cidrs,
        ipv6_prefix=settings.ipv6_prefix,
    )
    app.add_middleware(
        HeartbeatCap,
        blocks=blocks,
        streams=heartbeats,
        address=lambda scope: addresses.client_address(
            (scope.get("client") or (None,))[0], Request(scope).headers.get("x-forwarded-for")
        ),
    )
    app.add_middleware(
        GradioGuard,
        blocks=blocks,
        body_limits={CALL_PATH: call_limit},
        # a call is a frame (its JSON line, then its files' bytes): the route checks its line
        json_limits_by_path={CALL_PATH: None},
        elsewhere=(DASHBOARD_PATH,),
    )  # the dashboard is its own Blocks, behind its login
    if admin_token:  # /admin: no cross-site changes, login cookies that end, no guessing
        app.add_middleware(OperatorGuard, dashboard_path=DASHBOARD_PATH, throttle=GuessThrottle(), addresses=addresses)
    # No browser page of another origin reads the GPU tier (its dashboard's results, the
    # session token Gradio's /token reflects): the frontend's mechanism with no origin
    # allowed, which also makes Gradio's own CORS layer (it echoes any Origin with
    # credentials for a public Host) step aside.
    app.add_middleware(CORSMiddleware, allow_origins=[], allow_credentials=False)
    return app


def create_app() -> FastAPI:
    """App factory for uvicorn (``deploy/serve.py``): settings from the environment."""
    # The GPU thread must get the GIL back quickly when a batch ends, or the GPU idles
    # while the event loop runs Python (default switch interval: 5 ms). A process-wide
    # switch, so it is set here, where the process is the GPU tier's.
    sys.setswitchinterval(0.001)
    # The tier's Gradio cache is its own, never a frontend's on the same machine (splitspace
    # dev): it holds only files in transit, which it deletes after SPLITSPACE_GPU_FILES_TTL_S.
    use_own_cache("gpu")
    return build_app(Settings())
