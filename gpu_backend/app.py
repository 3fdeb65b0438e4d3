"""The GPU tier: a thin Gradio app over the runner, the scheduler and the model.

Wiring only. Every call's identity token is verified before any work; the
request is validated again (the GPU tier trusts nothing); admission, fair
order and execution are the runner's. Two ways in, same rules: Gradio's
``/infer`` (for ``gradio_client`` and any Gradio client) and the direct route
(``direct_route.py``, the frontend's default hop). Gradio's own queue must not
reorder what the scheduler decides, so the endpoints have no concurrency limit,
``max_threads`` is raised well above what admission lets in, and
``queue(api_open=False)`` closes the queue-skipping ``/gradio_api/run/`` route.
"""

# No `from __future__ import annotations` here: Gradio evaluates the handlers' type hints
# on every call, and string annotations make that an eval each time.
import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import gradio as gr
from fastapi import APIRouter, Body, FastAPI, HTTPException, Request
from fastapi.responses import Response
from starlette.routing import Route

from session.identity import Identity
from session.token import IdentityTokens
from shared.errors import SplitspaceError
from shared.guard import GradioGuard
from shared.headers import IDENTITY_HEADER
from shared.quota_watch import QuotaWatcher
from shared.schema import request_from_dict
from shared.settings import Settings

from . import gpu
from .admin import Overrides, admin_router, limits_function
from .cost import CostModel
from .direct_route import INFER_PATH, MAX_BODY_BYTES, STANDING_PATH, DirectRoutes
from .metrics import CONTENT_TYPE, GpuMetrics
from .model import ModelExecutor
from .runner import GpuRunner, client_ref
from .scheduler import FairScheduler
from .usage import SqliteUsageStore

log = logging.getLogger("splitspace.gpu")


BOOT_ID = uuid.uuid4().hex
"""Changes whenever this process (re)starts (``splitspace dev --reload`` reloads the page then)."""


def to_gradio_error(exc: SplitspaceError) -> gr.Error:
    return gr.Error(exc.user_text(), title=exc.title, print_exception=False)


class GpuTier:
    """Everything the GPU tier holds, built once from settings."""

    def __init__(self, settings: Settings, executor: ModelExecutor | None = None) -> None:
        self.settings = settings
        # The GPU thread must get the GIL back quickly when a batch ends, or the GPU
        # idles while the event loop runs Python (default switch interval: 5 ms).
        sys.setswitchinterval(0.001)
        self.tokens = IdentityTokens(settings.secrets)
        if not self.tokens.configured:
            log.warning("no SPLITSPACE_SECRET: the GPU tier refuses every call")
        # The loaded model lives in gpu.py (a ZeroGPU worker reaches it there), nowhere else.
        if executor is not None:
            gpu.set_executor(executor)
        else:
            gpu.load_model(settings.model)
        self._model_lock = asyncio.Lock()
        self.watcher = QuotaWatcher(settings.quotas)
        self.store = SqliteUsageStore(settings.state_path)
        self.overrides = Overrides(self.store)
        self.scheduler = FairScheduler(
            clock=time.time,
            limits=limits_function(lambda: self.watcher.current, self.overrides),
            store=self.store,
            capacity=1,
        )
        self.metrics = GpuMetrics(lambda: self.with_scheduler(FairScheduler.depth_by_tier))
        self.runner = GpuRunner(
            self.scheduler,
            CostModel(lambda s, w, h, b: gpu.current_executor().estimate_seconds(s, w, h, b)),
            run_batch=gpu.generate_on_gpu,
            resolve=lambda req, seed: gpu.current_executor().resolve(req, seed),
            model_name=lambda: gpu.current_executor().name,
            max_batch=settings.max_batch,
            clock=time.time,
            on_event=self.metrics.on_event,
        )

    async def change_model(self, spec: str) -> dict[str, Any]:
        """Load another model without a restart: requests in flight finish on the old one,
        new ones queue (none is refused) and run on the new one. A spec that fails to
        load leaves the old model in place and raises ValueError."""
        async with self._model_lock:
            previous = gpu.current_executor().name

            def change() -> None:
                executor = ModelExecutor.from_spec(spec)
                gpu.set_executor(executor)
                self.runner.cost.factor = 1.0  # the calibration was the old model's

            await asyncio.to_thread(self.runner.swap, change)
            log.info("model changed from %s to %s", previous, spec)
            return {"model": gpu.current_executor().name, "previous": previous}

    def with_scheduler(self, read: Callable[[FairScheduler], Any]) -> Any:
        """Read the scheduler under the runner's lock (the GPU threads change it too)."""
        with self.runner.locked() as scheduler:
            return read(scheduler)

    def verify_token(self, token: str | None) -> Identity:
        """The caller's identity, or Unauthorized (counted in the metrics)."""
        try:
            return self.tokens.verify(token)
        except SplitspaceError:
            self.metrics.refuse("unauthorized")
            raise

    def verify(self, request: gr.Request | None) -> Identity:
        headers = request.headers if request is not None else {}
        try:
            return self.verify_token(headers.get(IDENTITY_HEADER))
        except SplitspaceError as exc:
            raise to_gradio_error(exc) from None

    def standing(self, identity: Identity) -> dict[str, Any]:
        """The caller's own quota standing."""
        stats = dict(self.with_scheduler(lambda s: s.client_stats(client_ref(identity))))
        stats["tier"] = self.watcher.current.tier_name(
            identity.client_id, identity.tier, self.overrides.get(identity.client_id)
        )
        stats["client"] = identity.client_id
        return stats

    def live_caps(self) -> dict[str, int]:
        """max_running + max_queued of every client with an override, as the frontend
        counts them (operators' overrides live here, not in the frontend's quota file)."""
        config = self.watcher.current
        ids = set(config.clients) | set(self.overrides.all())
        caps = {}
        for client_id in ids:
            if client_id.startswith("session:"):
                continue  # the frontend caps sessions by address
            tier_name = next((k.tier for k in config.keys if f"key:{k.name}" == client_id), "anonymous")
            limits = config.limits_for(client_id, tier_name, self.overrides.get(client_id))
            caps[client_id] = limits.max_running + limits.max_queued
        return caps

    def health(self) -> dict[str, Any]:
        ex = gpu.current_executor()
        depth = self.with_scheduler(FairScheduler.depth_by_tier)
        return {
            "status": "ok",
            "boot_id": BOOT_ID,
            "model": ex.name,
            "placeholder_model": ex.is_placeholder,
            "defaults": {"steps": ex.preset.steps, "guidance_scale": ex.preset.guidance_scale},
            "queued": sum(q for q, _ in depth.values()),
            "running": sum(r for _, r in depth.values()),
        }


def build_blocks(tier: GpuTier) -> gr.Blocks:
    async def infer(
        prompt: str,
        negative_prompt: str = "",
        width: int = 512,
        height: int = 512,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = -1,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> AsyncIterator[dict]:
        """Generate one image for the identity in X-Splitspace-Identity (frontend only)."""
        tier.metrics.calls.inc()
        identity = tier.verify(request)
        try:
            req = request_from_dict(
                dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                     steps=steps, guidance_scale=guidance_scale, seed=seed),
                tier.settings.limits,
            )
            # aclosing: when the frontend goes away, Gradio closes this generator at its
            # next yield; the runner must drop the queued job then, not at GC.
            updates = tier.runner.generate(identity, req)
            async with contextlib.aclosing(updates):
                async for update in updates:
                    yield update
        except SplitspaceError as exc:
            raise to_gradio_error(exc) from None
        except gr.Error:
            raise  # e.g. ZeroGPU's own "ZeroGPU quota exceeded": passed through as is
        except Exception as exc:  # the model failed: say so, without internals
            log.exception("model failure")
            raise gr.Error(f"GPU error: the model failed ({type(exc).__name__})", title="GPU error",
                           print_exception=False) from None

    async def standing(request: gr.Request = None) -> dict:  # type: ignore[assignment]
        """The caller's own quota standing (frontend only)."""
        return tier.standing(tier.verify(request))

    with gr.Blocks(title="splitspace GPU tier") as blocks:
        gr.Markdown("splitspace GPU tier. Not for the public: the frontend is its only caller.")
        gr.api(infer, api_name="infer", concurrency_limit=None)
        gr.api(standing, api_name="standing", concurrency_limit=None)
    return blocks


def model_routes(router: APIRouter, tier: GpuTier) -> None:
    """``/admin/model``: which model is loaded, and changing it live."""

    @router.get("/model")
    async def show_model() -> dict[str, Any]:
        return {"model": gpu.current_executor().name}

    @router.put("/model")
    async def set_model(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
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

    async def watch_quotas() -> None:
        while True:
            await asyncio.sleep(1.0)
            tier.watcher.check()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(watch_quotas())
        try:
            yield
        finally:
            task.cancel()
            tier.runner.close()

    app = FastAPI(lifespan=lifespan)
    app.state.tier = tier

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        doc = tier.health()
        token = request.headers.get(IDENTITY_HEADER)
        if token:  # a frontend (it holds the secret) also learns the live in-flight caps
            try:
                tier.tokens.verify(token)
            except SplitspaceError:
                return doc
            doc["caps"] = tier.live_caps()
        return doc

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
            config=lambda: tier.watcher.current,
            quota_status=lambda: {
                "path": str(tier.watcher.path) if tier.watcher.path else None,
                "last_error": tier.watcher.last_error,
            },
            extra_routes=lambda router: model_routes(router, tier),
        )
    )

    direct = DirectRoutes(
        tier.runner, verify=tier.verify_token, limits=settings.limits, standing=tier.standing,
        on_call=tier.metrics.calls.inc,
    )
    for path in (INFER_PATH, STANDING_PATH):  # before the mount at "/", which catches everything after it
        app.router.routes.append(Route(path, direct, methods=["POST"]))

    blocks = build_blocks(tier)
    blocks.max_threads = settings.max_threads  # before queue(): the queue sizes its workers from it
    blocks.queue(api_open=False, max_size=settings.queue_max_size, default_concurrency_limit=None)
    app = gr.mount_gradio_app(app, blocks, path="", ssr_mode=False, footer_links=["api"])
    app.add_middleware(GradioGuard, blocks=blocks, body_limits={INFER_PATH: MAX_BODY_BYTES})
    return app


def create_app() -> FastAPI:
    """App factory for uvicorn (``deploy/serve.py``): settings from the environment."""
    return build_app(Settings())

