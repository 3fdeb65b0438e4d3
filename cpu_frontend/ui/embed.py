"""Example pages that embed the frontend in another page: ``/embed/webcomponent`` and ``/embed/iframe``.

They show the two ways Gradio apps are embedded (Gradio's ``<gradio-app>`` web
component, and a plain ``<iframe>``), served by the frontend itself so that they
work offline and always match the installed Gradio.

The web component's script is the installed Gradio's own build, which the
mounted app already serves under ``/assets/``; its file name carries a content
hash that changes with every Gradio release, so it is read from
``gradio/templates/frontend/gradio.js`` (the loader that Gradio's CDN serves as
``gradio.js``), not hard-coded.

Both pages carry ``<base href>`` pointing at the frontend's root: ``../`` (the
frontend that served them, so a path prefix added by a proxy still works), or
``frontend_url_hint`` (the frontend's public URL, e.g.
``https://alice-splitspace.hf.space``) when given. The base matters for the web
component: when its script is on the page's own origin, Gradio loads the
component's stylesheet (``./assets/index-*.css``) relative to the document, not
to the script, so without it a page under ``/embed/`` would ask for
``/embed/assets/...``. Without a hint the web component's ``src`` is computed in
the browser from the base, so it is the public origin whatever proxy is in front.
"""

from __future__ import annotations

import html
import importlib.resources
import re
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

EMBED_PREFIX = "/embed"

_LOADER_RE = re.compile(r"""import\(\s*["']\./(assets/index-[^"']+\.js)["']\s*\)""")
_INDEX_RE = re.compile(r"""<script[^>]*type="module"[^>]*src="\./(assets/index-[^"]+\.js)\"""")


def web_component_script() -> str:
    """Path, relative to the app's root, of the installed Gradio's web component script.

    E.g. ``assets/index-DphvyggB.js``. Raises RuntimeError when the installed
    Gradio has no built frontend in the expected place.
    """
    frontend = importlib.resources.files("gradio").joinpath("templates", "frontend")
    for name, pattern in (("gradio.js", _LOADER_RE), ("index.html", _INDEX_RE)):
        try:
            text = frontend.joinpath(name).read_text(encoding="utf-8")
        except (FileNotFoundError, OSError):
            continue
        if match := pattern.search(text):
            return match.group(1)
    raise RuntimeError("the installed gradio has no web component script in templates/frontend")


def _checked_hint(hint: str | None) -> str | None:
    if not hint:
        return None
    hint = hint.strip().rstrip("/")
    parts = urlsplit(hint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"frontend_url_hint must be an http(s) URL, got {hint!r}")
    return hint


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<base href="{base}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
{head}
<style>
  body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1rem; }}
  pre {{ background: #f4f4f5; padding: .75rem; overflow-x: auto; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def _webcomponent_page(base: str, script: str, app_src: str | None) -> str:
    if app_src is not None:
        element = f'<gradio-app id="splitspace" src="{html.escape(app_src)}" eager="true"></gradio-app>'
        set_src = ""
    else:
        element = '<gradio-app id="splitspace" eager="true"></gradio-app>'
        # A classic script runs while the page is parsed, before the (deferred) module
        # script defines <gradio-app>, so the element sees `src` when it is constructed.
        set_src = (
            "<script>document.getElementById('splitspace').setAttribute("
            "'src', new URL('.', document.baseURI).href.replace(/\\/$/, ''));</script>"
        )
    origin = app_src or "https://your-frontend.example"
    snippet = html.escape(
        f'<script type="module" src="{origin}/{script}"></script>\n<gradio-app src="{origin}"></gradio-app>'
    )
    body = (
        "<p>The splitspace frontend, embedded with Gradio's <code>&lt;gradio-app&gt;</code> web "
        "component. Its script is served by the frontend itself (no CDN needed); on another site:</p>\n"
        f"<pre>{snippet}</pre>\n{element}\n{set_src}"
    )
    head = f'<script type="module" crossorigin src="{html.escape(script)}"></script>'
    return _PAGE.format(base=html.escape(base), title="splitspace: embedded as a web component", head=head, body=body)


def _iframe_page(base: str, app_src: str | None) -> str:
    origin = app_src or "https://your-frontend.example"
    snippet = html.escape(f'<iframe src="{origin}/" width="100%" height="900" style="border:0"></iframe>')
    body = (
        "<p>The splitspace frontend in an <code>&lt;iframe&gt;</code>, as Hugging Face shows a Space. "
        "Over HTTPS the session cookie is <code>SameSite=None; Secure; Partitioned</code>, so it also "
        "works when the frame is on another site.</p>\n"
        f"<pre>{snippet}</pre>\n"
        '<iframe id="splitspace" title="splitspace" src="./" width="100%" height="900" '
        'style="border:0" allow="clipboard-write"></iframe>'
    )
    return _PAGE.format(base=html.escape(base), title="splitspace: embedded in an iframe", head="", body=body)


def embed_routes(frontend_url_hint: str | None = None) -> APIRouter:
    """A router with ``GET /embed/webcomponent`` and ``GET /embed/iframe``.

    Include it in the frontend's FastAPI app before mounting Gradio at ``/``
    (a mount at the root would otherwise catch these paths).
    """
    hint = _checked_hint(frontend_url_hint)
    script = web_component_script()
    # The pages live at /embed/<name>, so "../" is the frontend's root, path prefix included.
    base = f"{hint}/" if hint else "../"
    webcomponent_html = _webcomponent_page(base, script, hint)
    iframe_html = _iframe_page(base, hint)

    router = APIRouter(prefix=EMBED_PREFIX, include_in_schema=False)

    @router.get("/webcomponent", response_class=HTMLResponse)
    async def webcomponent() -> HTMLResponse:
        return HTMLResponse(webcomponent_html)

    @router.get("/iframe", response_class=HTMLResponse)
    async def iframe() -> HTMLResponse:
        return HTMLResponse(iframe_html)

    return router
