"""The built-in's page: the Gradio Blocks that people see, and the API endpoints they expose.

Layout and wiring only; every sentence comes from ``ui_text.py``. Two kinds of
events live here:

- the API (``/generate``, ``/quota``): ``/generate`` is the app's GPU event
  (``text_to_image_app.py`` registers it, given the components), ``/quota`` the caller's
  standing; both with no trigger on the page (``gr.on(triggers=[])``) and the same input
  and output components as ever, so their schema does not move;
- the page's own (private) events: the Generate button runs ``on_generate``, which
  follows the app's GPU function through the serving tier's services (:class:`AppPage`,
  ``shared/app/services.py``) and turns each status into words in Gradio's status
  display over the image (``gr.Progress``); a refusal becomes guidance with a
  countdown, during which the button is off; the quota line is refreshed after every
  generation and on load; recent images stay in this browser (``gr.BrowserState``,
  thumbnails in localStorage), each one re-usable.

The history never goes to the server: a noise image's thumbnail alone is most of the
frontend's 16 KiB body limit, and it would ride along with every click. The server
sends the new image's entry once; the browser adds it to its history (a ``js=`` step),
draws the history (``RECENT_JS``) and sends back only what a click needs: the last
image's GPU time (for the wait estimate) or the request fields of a thumbnail clicked.

The model's name and its default steps and guidance come from the GPU tiers' health
documents, read again on every page load, so a live model change or a GPU tier that
started after the frontend shows the right defaults without a restart.
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import gradio as gr

from splitspace.shared.app import ui_text
from splitspace.shared.app.services import DoorView, services
from splitspace.shared.app.ui_text import Refusal
from splitspace.shared.contract.errors import QUEUE_FULL, SplitspaceError, Throttled
from splitspace.shared.contract.hop import Status, status_for_api
from splitspace.shared.contract.schema import REQUEST_FIELDS, Limits

FALLBACK_DEFAULTS = {"steps": 4, "guidance_scale": 0.0}
"""Slider defaults while no GPU tier has answered a health check."""
PLACEHOLDER_NOTE = (
    "**Note:** this deployment runs a stand-in model for testing: its images will be noise or blank, not pictures."
)
"""For visitors, once. How to serve a real model is the operators' to read: the GPU tier's
log says it at start, ``/health`` has ``placeholder_model`` and ``splitspace dev`` prints it."""
PROMPT_PLACEHOLDER = "Describe the image, e.g. a red fox in fresh snow at dawn, soft light"
EXAMPLES = [
    "A red fox in fresh snow at dawn, soft golden light, 35mm photo",
    "An isometric illustration of a tiny island village, pastel colours",
    "A bowl of ramen on a wooden table, steam rising, food photography",
    "A watercolour of a lighthouse on a cliff in a storm",
    "A cosy reading nook with plants and a warm lamp, evening light",
]
RECENT_MAX = 12
"""Recent images kept in the browser (thumbnails in localStorage: a 160 px JPEG of noise,
the worst case, is about 10 KB as a data URL; of a picture, a few KB)."""
THUMB_SIDE = 160
RECENT_KEY = "splitspace-recent"
BROWSER_STATE_SALT = b"splitspace.browser-state"

COUNTDOWN_JS = """
const fmt = (s) => {  // as ui_text.duration
  if (s < 90) return `${s} s`;
  const m = Math.ceil(s / 60);
  return m < 120 ? `${m} min` : `${Math.floor(m / 60)} h` + (m % 60 ? ` ${m % 60} min` : '');
};
setInterval(() => {  // counts down the refusal's retry; at 0 the page turns the button back on
  const el = element.querySelector('.splitspace-countdown');
  if (!el || el.dataset.done) return;
  if (!el.dataset.until) el.dataset.until = String(Date.now() + Number(el.dataset.seconds) * 1000);
  const left = Math.ceil((Number(el.dataset.until) - Date.now()) / 1000);
  if (left > 0) { el.textContent = fmt(left); return; }
  el.dataset.done = '1';
  el.closest('.splitspace-retry').textContent = 'You can try again now.';
  trigger('end');
}, 250);
"""
STATUS_WORDS_JS = """
// Gradio's status display over the image appends its progress to our words as
// "- 18.9%" (StatusTracker: desc, "-", percentage, each its own text node); the
// percentage of a guessed wait means nothing to a person: the place and the time stay.
const root = element.getRootNode();
const noise = /^(-|\\d+(\\.\\d+)?%)$/;
const words = () => {
  for (const inner of root.querySelectorAll('#splitspace-image .progress-level-inner')) {
    const texts = document.createTreeWalker(inner, NodeFilter.SHOW_TEXT);
    for (let n = texts.nextNode(); n; n = texts.nextNode()) {
      if (noise.test(n.nodeValue.trim())) n.nodeValue = '';
    }
  }
};
new MutationObserver(words).observe(root, {subtree: true, childList: true, characterData: true});
"""
RECENT_JS = """
// The history is drawn here, in the browser, from this component's value (the browser's
// history list): one button per image, made with the DOM, so a stored prompt is only text.
const shown = () => (Array.isArray(props.value) ? props.value : [])
  .filter((item) => item && typeof item === 'object').slice(0, RECENT_MAX);
const draw = () => {
  const grid = element.querySelector('.splitspace-recent-grid');
  if (!grid) return;
  grid.replaceChildren(...shown().map((item, index) => {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'splitspace-thumb';
    b.dataset.index = String(index);
    b.title = `${item.prompt ?? ''} · seed ${item.seed ?? ''}`;
    const img = document.createElement('img');
    img.alt = String(item.prompt ?? '');
    // Only our own data URLs: a stored value is never a link elsewhere.
    if (typeof item.thumb === 'string' && item.thumb.startsWith('data:image/')) img.src = item.thumb;
    b.append(img);
    return b;
  }));
};
draw();
watch('value', draw);
element.addEventListener('click', (e) => {  // a thumbnail puts its settings back: those alone go to the server
  const b = e.target.closest('[data-index]');
  const item = b && shown()[Number(b.dataset.index)];
  if (!item) return;
  const fields = Object.fromEntries(REQUEST_FIELDS.filter((k) => k in item).map((k) => [k, item[k]]));
  trigger('select', {index: Number(b.dataset.index), value: fields, selected: true});
});
""".replace("RECENT_MAX", str(RECENT_MAX)).replace("REQUEST_FIELDS", json.dumps(list(REQUEST_FIELDS)))
KEPT_JS = f"""
(items) => Array.isArray(items) ? items.filter((i) => i && typeof i === 'object').slice(0, {RECENT_MAX}) : []
"""
"""The history as the browser keeps it: a list of entries, at most RECENT_MAX."""
LAST_GPU_JS = f"""
(...values) => {{  // Generate sends the form and, of the history, only the last image's GPU time
  const last = ({KEPT_JS})(values[{len(REQUEST_FIELDS)}])[0];
  return [...values.slice(0, {len(REQUEST_FIELDS)}), typeof last?.gpu_s === 'number' ? last.gpu_s : null];
}}
"""
ADD_RECENT_JS = f"""
(entry, items) => {{  // the new image's entry, from the server, goes first; then it is cleared
  const kept = ({KEPT_JS})(items);
  const now = entry && typeof entry === 'object' ? [entry, ...kept].slice(0, {RECENT_MAX}) : kept;
  return [now, now, null];
}}
"""
RECENT_CSS = """
.splitspace-recent-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(72px, 1fr)); gap: 6px; }
.splitspace-thumb { padding: 0; border: 1px solid var(--border-color-primary); border-radius: 6px;
  background: none; cursor: pointer; overflow: hidden; aspect-ratio: 1; }
.splitspace-thumb img { width: 100%; height: 100%; object-fit: cover; display: block; }
.splitspace-recent-empty { color: var(--body-text-color-subdued); }
"""
QUOTA_CSS = """
.splitspace-quota-bar { height: 8px; border-radius: 4px; background: var(--border-color-primary); overflow: hidden; }
.splitspace-quota-bar > div { height: 100%; background: var(--color-accent); }
.splitspace-quota-bar.full > div { background: var(--error-text-color, #dc2626); }
.splitspace-quota p { margin: 4px 0 0; }
"""
NOTICE_CSS = ".splitspace-refusal { color: var(--error-text-color, #b91c1c); margin: 0; }"


class AppPage:
    """The page's backend: the built-in app's GPU function ``generate``
    (``builtin/text_to_image_app.py``) followed through the serving tier's services
    (``shared/app/services.py``; the frontend's, or one process's), as any app's CPU event
    would follow it. The refusal a call meets becomes data for the page to word."""

    def __init__(self, generate: Callable[..., Any], browser_secret: str) -> None:
        self.generate = generate
        self.browser_secret = browser_secret

    async def quota(self, request: gr.Request = None) -> dict:  # type: ignore[assignment]
        return await services().standing(request)

    async def ui_follow(
        self, values: dict[str, Any], request: gr.Request, on_status: Callable[[dict[str, Any]], bool]
    ) -> tuple[dict[str, Any], dict[str, Any]] | Refusal | None:
        tier = services()
        try:
            updates = tier.follow(self.generate, [values[name] for name in REQUEST_FIELDS], request)
            async with contextlib.aclosing(updates):
                async for update in updates:
                    if isinstance(update, Status):
                        if not on_status(status_for_api(update)):
                            return None
                    else:
                        return update[0], update[1]
        except gr.Error as exc:
            return refusal_of(exc, tier.door(request))
        return None


def refusal_of(exc: gr.Error, door: DoorView) -> Refusal:
    """What the page says of an error: the project's own (the ``gr.Error``'s context, as the
    frontend raises it), else its title and message."""
    cause = exc.__context__
    if not isinstance(cause, SplitspaceError):
        cause = SplitspaceError(str(exc.message), title=exc.title or "Error")
    if isinstance(cause, Throttled):
        retry = cause.retry_after_s
        if cause.title == QUEUE_FULL:  # a retry needs one of those to finish: about a job's time
            retry = max(retry, door.seconds_per_job)
        return Refusal(cause.title, cause.reason, retry, door.in_flight, door.shared_address)
    return Refusal(cause.title, cause.message, None, door.in_flight, door.shared_address)


class LiveModel:
    """The model a GPU tier serves, as its latest health document says."""

    def __init__(self, health: Callable[[], dict[str, Any] | None]) -> None:
        self._health = health

    def doc(self) -> dict[str, Any]:
        return self._health() or {}

    def defaults(self) -> dict[str, Any]:
        return {**FALLBACK_DEFAULTS, **(self.doc().get("defaults") or {})}

    def heading(self) -> str:
        doc = self.doc()
        text = "# splitspace\nText to image on a shared GPU, scheduled fairly per client."
        if doc.get("placeholder_model"):  # its spec (`tiny`, `sleep:MS`) means nothing to a visitor
            return f"{text}\n\n{PLACEHOLDER_NOTE}"
        return f"{text} Model: `{doc.get('model', 'unknown (no GPU tier has answered yet)')}`."


def browser_state_secret(secrets: list[str]) -> str:
    """The key of the page's BrowserState, derived from the tiers' newest secret: every
    frontend replica, and the same frontend after a restart, can read what it wrote
    (Gradio's default is a fresh random key per process, which forgets on restart)."""
    return hmac.new(secrets[0].encode(), BROWSER_STATE_SALT, hashlib.sha256).hexdigest()


def thumbnail(png_path: str, side: int = THUMB_SIDE) -> str:
    """A small JPEG of the image as a data URL: the copy kept in the browser (the
    server's file is deleted after an hour)."""
    from PIL import Image

    with Image.open(png_path) as src:
        img = src.convert("RGB")
        img.thumbnail((side, side))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def recent_entry(png_path: str, info: dict[str, Any], prompt: str, negative_prompt: str) -> dict[str, Any]:
    """One image of the browser's history: enough to make it again, and its thumbnail."""
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": info["seed"],
        "width": info["width"],
        "height": info["height"],
        "steps": info["steps"],
        "guidance_scale": info["guidance_scale"],
        "gpu_s": info["gpu_s"],
        "thumb": thumbnail(png_path),
    }


class GoneTabs:
    """Sessions whose tab went away (Gradio's ``unload``), so their wait stops at the next
    status instead of holding a place on the GPU for nobody."""

    def __init__(self) -> None:
        self._following: Counter[str] = Counter()
        self._gone: set[str] = set()

    def follow(self, session: str) -> None:
        self._following[session] += 1

    def done(self, session: str) -> None:
        self._following[session] -= 1
        if self._following[session] <= 0:
            del self._following[session]
            self._gone.discard(session)

    def close(self, session: str) -> None:
        if session in self._following:
            self._gone.add(session)

    def gone(self, session: str) -> bool:
        return session in self._gone


ApiEvent = Callable[[list[Any], list[Any]], Any]
"""Registers ``/generate`` given its input and output components (no trigger on the page)."""


def build_page(limits: Limits, page: AppPage, generate_api: ApiEvent) -> gr.Blocks:
    """The page of the app whose GPU function ``page`` follows; ``generate_api`` registers
    ``/generate`` on the request's input components and the image and info outputs."""
    model = LiveModel(lambda: services().gpu_health())
    tabs = GoneTabs()
    with gr.Blocks(title="splitspace", delete_cache=(3600, 3600)) as blocks:
        heading = gr.Markdown("# splitspace\nText to image on a shared GPU, scheduled fairly per client.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    label="Prompt", max_length=limits.prompt_max_chars, lines=2, placeholder=PROMPT_PLACEHOLDER
                )
                with gr.Accordion("Advanced settings", open=False) as advanced:
                    negative = gr.Textbox("", label="Negative prompt", max_length=limits.negative_prompt_max_chars)
                    with gr.Row():
                        width = gr.Slider(
                            limits.min_side, limits.max_side, 512, step=limits.side_multiple, label="Width"
                        )
                        height = gr.Slider(
                            limits.min_side, limits.max_side, 512, step=limits.side_multiple, label="Height"
                        )
                    steps = gr.Slider(
                        limits.min_steps, limits.max_steps, FALLBACK_DEFAULTS["steps"], step=1, label="Steps"
                    )
                    guidance = gr.Slider(
                        limits.min_guidance,
                        limits.max_guidance,
                        FALLBACK_DEFAULTS["guidance_scale"],
                        step=0.5,
                        label="Guidance scale",
                    )
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                run = gr.Button("Generate", variant="primary")
                notice = gr.HTML(
                    "", js_on_load=COUNTDOWN_JS + STATUS_WORDS_JS, css_template=NOTICE_CSS, elem_id="splitspace-notice"
                )
                quota_box = gr.HTML(
                    ui_text.quota_html(None), js_on_load=None, css_template=QUOTA_CSS, elem_id="splitspace-quota"
                )
            with gr.Column():
                image = gr.Image(
                    label="Image", type="filepath", format="png", interactive=False, elem_id="splitspace-image"
                )
                caption = gr.Markdown(elem_id="splitspace-caption")
                with gr.Accordion("Details", open=False):
                    info_box = gr.JSON(label="Info")
                recent = gr.HTML(
                    [],
                    html_template=ui_text.recent_template(),
                    js_on_load=RECENT_JS,
                    css_template=RECENT_CSS,
                    elem_id="splitspace-recent",
                )
        # Below both columns: on a phone the image comes right after the button, examples after it.
        gr.Markdown("**Try one of these.**")
        gr.Examples(
            [[p] for p in EXAMPLES], inputs=[prompt], label="Examples", cache_examples=False, api_visibility="private"
        )
        history = gr.BrowserState([], storage_key=RECENT_KEY, secret=page.browser_secret)
        fresh = gr.JSON(None, visible=False)  # the new image's entry, on its way into the history
        quota_api_box = gr.JSON(label="Quota", visible=False)

        inputs = [prompt, negative, width, height, steps, guidance, seed]
        generate_api(inputs, [image, info_box])  # the API, as ever: no trigger on the page
        gr.on([], page.quota, None, quota_api_box, api_name="quota", concurrency_limit=None)

        async def on_generate(
            prompt: str,
            negative_prompt: str,
            width: Any,
            height: Any,
            steps: Any,
            guidance_scale: Any,
            seed: Any,
            last_gpu: Any,
            request: gr.Request,
            progress: gr.Progress = gr.Progress(),
        ) -> tuple[Any, ...]:
            values = dict(
                zip(REQUEST_FIELDS, (prompt, negative_prompt, width, height, steps, guidance_scale, seed), strict=True)
            )
            clicked = time.monotonic()
            started: list[float] = []  # when the GPU began (the first "running" status)
            # The last image's GPU time (LAST_GPU_JS): the browser's to say, a guess only.
            ok = isinstance(last_gpu, (int, float)) and not isinstance(last_gpu, bool) and 0 <= last_gpu < 3600
            last_gpu_s = float(last_gpu) if ok else 0.0
            session = request.session_hash or ""

            def on_status(status: dict[str, Any]) -> bool:
                waited = time.monotonic() - clicked
                if status.get("status") == "queued":
                    eta = float(status.get("eta_s") or 0.0)
                else:  # running: the last image's GPU time is the best guess of what is left
                    if not started:
                        started.append(time.monotonic())
                    eta = max(0.2, last_gpu_s - (time.monotonic() - started[0]))
                progress(ui_text.wait_fraction(waited, eta), desc=ui_text.waiting(status))
                return not tabs.gone(session)

            tabs.follow(session)
            try:
                outcome = await page.ui_follow(values, request, on_status)
            finally:
                tabs.done(session)
            if outcome is None:  # the tab went away
                return (gr.skip(),) * 6
            if isinstance(outcome, Refusal):
                can_retry_now = outcome.retry_s is None
                return (
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                    ui_text.refusal_html(outcome),
                    gr.Button(interactive=can_retry_now),
                    None,
                )
            image_out, info = outcome
            entry = await asyncio.to_thread(recent_entry, image_out["path"], info, prompt, negative_prompt)
            return image_out, ui_text.caption(info), info, "", gr.Button(interactive=True), entry

        async def on_quota(request: gr.Request) -> str:
            try:
                standing = await page.quota(request)
            except gr.Error as exc:
                return ui_text.quota_html(None, problem=exc.message)
            return ui_text.quota_html(ui_text.quota_line(standing))

        def on_reuse(evt: gr.SelectData) -> tuple[Any, ...]:
            # The clicked image's request fields, from the browser's history (RECENT_JS).
            item = evt.value if isinstance(evt.value, dict) else {}
            if not item:
                return (gr.skip(),) * (len(REQUEST_FIELDS) + 1)
            # The settings open, so that the seed put back is in sight.
            return (*(item.get(name, gr.skip()) for name in REQUEST_FIELDS), gr.Accordion(open=True))

        def on_load() -> tuple[Any, ...]:
            defaults = model.defaults()
            return model.heading(), defaults["steps"], defaults["guidance_scale"]

        page_outputs = [image, caption, info_box, notice, run, fresh]
        private: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": None}
        for trigger in (run.click, prompt.submit):
            # js=LAST_GPU_JS: of the history, only the last image's GPU time goes up.
            trigger(
                on_generate,
                [*inputs, history],
                page_outputs,
                js=LAST_GPU_JS,
                preprocess=False,
                postprocess=False,
                show_progress_on=[image],
                **private,
            ).then(None, [fresh, history], [history, recent, fresh], js=ADD_RECENT_JS, **private).then(
                on_quota, None, quota_box, show_progress="hidden", **private
            )
        notice.end(lambda: gr.Button(interactive=True), None, run, show_progress="hidden", **private).then(
            on_quota, None, quota_box, show_progress="hidden", **private
        )
        recent.select(on_reuse, None, [*inputs, advanced], show_progress="hidden", **private)
        blocks.load(None, history, recent, js=f"(items) => [({KEPT_JS})(items)]", **private)  # in the browser
        blocks.load(on_load, None, [heading, steps, guidance], show_progress="hidden", **private)
        blocks.load(on_quota, None, quota_box, show_progress="hidden", **private)

        def on_unload(request: gr.Request) -> None:
            tabs.close(request.session_hash or "")

        blocks.unload(on_unload)
    return blocks
