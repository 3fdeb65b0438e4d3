"""The CPU tier: the public Gradio UI and API, thin wiring over session/ and the transport.

Every request is resolved to an identity (API key, session cookie, address),
validated, checked against the client's in-flight cap, and forwarded with a
freshly minted identity token and the caller's ``x-ip-token``, as per-call
headers. The handlers are async generators with no concurrency limit, so the
frontend has no first-in-first-out stage, and a caller who goes away closes
the stream to the GPU tier, which drops the queued job.
"""

# No `from __future__ import annotations` here: Gradio evaluates the handlers' type hints
# on every call, and string annotations make that an eval each time.
import asyncio
import base64
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr
import httpx
from fastapi import FastAPI
from gradio import processing_utils, utils as gr_utils
from starlette.middleware.cors import CORSMiddleware

from session import ApiKeyring, Identity, IdentityResolver, IdentityTokens, SessionCookieMiddleware, SessionCookies
from session.address import AddressPolicy
from session.caller import CallerStamps
from shared.errors import SplitspaceError
from shared.guard import GradioGuard
from shared.headers import IDENTITY_HEADER, IP_TOKEN_HEADER
from shared.quota_watch import QuotaWatcher
from shared.schema import validate_request
from shared.settings import Settings

from . import gradio_tuning
from .backends import BackendPool
from .embed import embed_routes
from .hub_auth import backend_auth_headers
from .limits import InflightCaps
from .mcp_loopback import McpLoopback
from .transport import Transport

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
FALLBACK_DEFAULTS = {"steps": 4, "guidance_scale": 0.0}
TINY_NOTE = (
    "**Note:** this deployment serves `{model}`, a placeholder model (`tiny` has random weights, "
    "`sleep:MS` only waits): its images are noise or flat. Set `SPLITSPACE_MODEL` "
    "(e.g. `stabilityai/sd-turbo`) for real images."
)


def with_message(status: dict[str, Any]) -> dict[str, Any]:
    """A status update with a line for people ("position 3, about 2 s") beside the numbers.

    The UI shows it in the info box; API clients read ``position`` and ``eta_s``. (Not
    gr.Progress: REST callers never see it, and tracking it costs the queue CPU.)"""
    if status.get("status") == "queued":
        text = f"position {status['position']}, about {max(1, round(status['eta_s']))} s"
    else:
        text = "generating"
    return {**status, "message": text}


def image_output(path: str) -> dict[str, Any]:
    """The Image output as Gradio sends it (what ``gr.Image.postprocess`` makes of a PNG
    path). The events run with ``postprocess=False``: for outputs that are already
    final (a PNG file and a dict), Gradio's postprocess would only add two thread hops
    and a second pass over the file per call."""
    return {"path": path, "orig_name": "image.png", "mime_type": "image/png", "meta": {"_type": "gradio.FileData"}}


def to_gradio_error(exc: SplitspaceError) -> gr.Error:
    return gr.Error(exc.user_text(), title=exc.title, print_exception=False)


def build_transports(settings: Settings) -> list[Transport]:
    urls = settings.backend_urls
    if settings.transport == "gradio_client":
        from .gradio_client_transport import GradioClientTransport

        return [GradioClientTransport(u, timeout_s=settings.backend_timeout_s) for u in urls]
    if settings.transport == "httpx":
        from .httpx_transport import HttpxTransport

        return [HttpxTransport(u, timeout_s=settings.backend_timeout_s) for u in urls]
    from .direct_transport import DirectTransport

    return [DirectTransport(u, timeout_s=settings.backend_timeout_s) for u in urls]


class Frontend:
    """Everything the CPU tier holds, built once from settings."""

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
            addresses=AddressPolicy(trusted_proxies=settings.trusted_proxies,
                                    trusted_networks=settings.trusted_proxy_cidrs, ipv6_prefix=settings.ipv6_prefix),
            stamps=self.stamps,
        )
        self.caps = InflightCaps(lambda: self.watcher.current)
        self.pool = BackendPool(
            transports or build_transports(settings),
            health_headers=lambda: {IDENTITY_HEADER: self.tokens.mint(FRONTEND_IDENTITY)},
            on_health=lambda doc: self.caps.learn_all(doc.get("caps") or {}),
        )
        self.cache_dir = gr_utils.get_upload_folder()

    def _on_quotas(self, config: Any) -> None:
        self.resolver.keyring = ApiKeyring(config.keys)

    def identity(self, request: gr.Request | None) -> Identity:
        if request is None:
            raise SplitspaceError("no request context", title="Error")
        peer = request.client.host if request.client else None
        return self.resolver.resolve(request.headers, request.cookies, peer)

    def forward_headers(self, identity: Identity, request: gr.Request) -> dict[str, str]:
        headers = {IDENTITY_HEADER: self.tokens.mint(identity)}
        ip_token = request.headers.get(IP_TOKEN_HEADER)
        if ip_token:
            headers[IP_TOKEN_HEADER] = ip_token
        return headers

    def save_image(self, png_b64: str) -> str:
        return processing_utils.save_bytes_to_cache(base64.b64decode(png_b64), "image.png", self.cache_dir)

    def model_info(self) -> dict[str, Any]:
        """The GPU tier's model and defaults, for building the UI (blocking, once at start)."""
        for url in self.settings.backend_urls:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                return httpx.get(
                    f"{url}/health", timeout=3.0, headers=backend_auth_headers()
                ).raise_for_status().json()
        log.warning("no GPU tier answered at start; the UI uses generic defaults")
        return {}


def build_blocks(fe: Frontend) -> gr.Blocks:
    info = fe.model_info()
    defaults = info.get("defaults") or FALLBACK_DEFAULTS
    limits = fe.settings.limits

    async def generate(
        prompt: str,
        negative_prompt: str = "",
        width: int = 512,
        height: int = 512,
        steps: int = defaults["steps"],
        guidance_scale: float = defaults["guidance_scale"],
        seed: int = -1,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> AsyncIterator[tuple[str | None, dict]]:
        try:
            identity = fe.identity(request)
            req = validate_request(
                prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                steps=steps, guidance_scale=guidance_scale, seed=seed, limits=limits,
            )
            with fe.caps.hold(identity):
                data = [req.prompt, req.negative_prompt, req.width, req.height, req.steps,
                        req.guidance_scale, req.seed]
                # aclosing: when the caller goes away, Gradio closes this generator at its
                # next yield, and the stream to the GPU tier must close then, not at GC.
                updates = fe.pool.stream("infer", data, fe.forward_headers(identity, request))
                async with contextlib.aclosing(updates):
                    async for update in updates:
                        fe.caps.learn(identity, update.pop("cap", None))
                        if update.get("status") == "done":
                            yield image_output(fe.save_image(update["image_png_b64"])), update["info"]
                            return
                        yield None, with_message(update)
        except SplitspaceError as exc:
            raise to_gradio_error(exc) from None

    async def quota(request: gr.Request = None) -> dict:  # type: ignore[assignment]
        try:
            identity = fe.identity(request)
            headers = fe.forward_headers(identity, request)
            result: dict[str, Any] = {}
            updates = fe.pool.stream("standing", [], headers)
            async with contextlib.aclosing(updates):
                async for update in updates:
                    result = update
            result["in_flight_here"] = fe.caps.count(identity)
            return result
        except SplitspaceError as exc:
            raise to_gradio_error(exc) from None

    model = info.get("model", "unknown")
    with gr.Blocks(title="splitspace", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"# splitspace\nText to image on a shared GPU, scheduled fairly per client. Model: `{model}`.")
        if info.get("placeholder_model"):
            gr.Markdown(TINY_NOTE.format(model=model))
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", max_length=limits.prompt_max_chars, lines=2)
                with gr.Accordion("Advanced settings", open=False):
                    negative = gr.Textbox("", label="Negative prompt", max_length=limits.negative_prompt_max_chars)
                    with gr.Row():
                        width = gr.Slider(limits.min_side, limits.max_side, 512, step=limits.side_multiple, label="Width")
                        height = gr.Slider(limits.min_side, limits.max_side, 512, step=limits.side_multiple, label="Height")
                    steps = gr.Slider(limits.min_steps, limits.max_steps, defaults["steps"], step=1, label="Steps")
                    guidance = gr.Slider(limits.min_guidance, limits.max_guidance, defaults["guidance_scale"], step=0.5, label="Guidance scale")
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", format="png", interactive=False)
                info_box = gr.JSON(label="Info")
                with gr.Accordion("Your quota", open=False):
                    quota_box = gr.JSON(label="Quota")
                    refresh = gr.Button("Refresh quota")
        inputs = [prompt, negative, width, height, steps, guidance, seed]
        # preprocess=False: our validation (one definition, errors that name the field) sees
        # the raw values first, instead of the components' own range checks.
        # postprocess=False: see image_output().
        run.click(generate, inputs, [image, info_box], api_name="generate", concurrency_limit=None,
                  preprocess=False, postprocess=False)
        prompt.submit(generate, inputs, [image, info_box], api_visibility="private", concurrency_limit=None,
                      preprocess=False, postprocess=False)
        refresh.click(quota, None, quota_box, api_name="quota", concurrency_limit=None)
    return blocks


def build_app(settings: Settings | None = None, transports: list[Transport] | None = None) -> FastAPI:
    settings = settings or Settings()
    gradio_tuning.apply()
    fe = Frontend(settings, transports)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def watch() -> None:
            while True:
                await asyncio.sleep(1.0)
                fe.watcher.check()

        task = asyncio.create_task(watch())
        await fe.pool.start()
        try:
            yield
        finally:
            task.cancel()
            await fe.pool.aclose()

    app = FastAPI(lifespan=lifespan)
    app.state.frontend = fe

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if any(b.healthy for b in fe.pool.backends) else "no GPU backend",
            "boot_id": BOOT_ID,
            "backend_boot_ids": [(b.last_health or {}).get("boot_id") for b in fe.pool.backends],
            # No URLs: this page is public, and the GPU tiers' addresses are not.
            "backends": [{"healthy": b.healthy, "outstanding": b.outstanding} for b in fe.pool.backends],
        }

    app.include_router(embed_routes())  # before the mount at "/", which catches everything after it
    blocks = build_blocks(fe)
    blocks.max_threads = settings.max_threads
    blocks.queue(default_concurrency_limit=None)
    app = gr.mount_gradio_app(
        app, blocks, path="", ssr_mode=False, show_error=True, mcp_server=settings.mcp,
        head=DEV_RELOAD_SCRIPT if settings.dev_reload else None,
    )
    app.add_middleware(GradioGuard, blocks=blocks, body_limits={"/gradio_api/mcp": MCP_MAX_BODY_BYTES})
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

