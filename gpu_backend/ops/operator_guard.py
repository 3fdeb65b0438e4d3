"""The operators' door on the GPU tier: ``/admin/...`` answers operators, from their own page only.

Why this module exists: the dashboard (``/admin/ui``, Gradio's login) and the admin API
(``/admin/...``, a token header) change quotas and models. Gradio's login cookie was
``SameSite=None`` and never expired, and nothing stopped another site from making the
operator's browser post to the dashboard's events, or anyone from guessing the token as
fast as the network allows. This pure ASGI layer, in front of the GPU tier's whole app,
adds what those two lack (cross-origin *reads* are refused by Starlette's
``CORSMiddleware``, the frontend's mechanism, which the GPU app adds with no origin allowed):

- **No cross-site changes.** Every request under ``/admin`` with a method other than GET,
  HEAD or OPTIONS is refused (403) when the browser says it comes from another site:
  ``Sec-Fetch-Site`` other than ``same-origin`` or ``none``, or, from a browser too old to
  send that header, an ``Origin`` whose host is not the request's ``Host``. A request with
  neither header is not a browser's cross-site request (the CLI, curl) and passes.
  That covers Gradio's ``queue/join``, ``/run``, ``/call``, ``/login`` and the admin API's
  POST, PUT and DELETE alike. (The algorithm of Go's ``http.CrossOriginProtection``.)
- **Cookies that end.** The dashboard's login cookies get ``SameSite=Strict`` and
  ``Max-Age`` = the session's lifetime (``operator_sessions.SESSION_S``); the server-side
  session ends then too (``OperatorSessions``), and at logout.
- **No guessing.** A wrong dashboard password (Gradio's ``/login`` answers 400) or a wrong
  admin token (the admin API answers 401) counts against the caller's address (the same
  address rules as everywhere: ``session/address.py``); after a few, that address gets
  429 with ``Retry-After`` on both, before any check of what it sent (``GuessThrottle``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitspace.gpu_backend.ops.operator_sessions import SESSION_S, GuessThrottle
from splitspace.session.address import AddressPolicy
from splitspace.shared.contract.errors import RATE_LIMITED

__all__ = ["ADMIN_PREFIX", "CROSS_SITE", "OperatorGuard", "cross_site"]

ADMIN_PREFIX = "/admin"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CROSS_SITE = "Cross-site request refused"
LOGIN_COOKIE = "access-token"
"""Gradio's login cookies are ``access-token-<id>`` and ``access-token-unsecure-<id>``."""


def cross_site(headers: Headers) -> bool:
    """Whether a browser sent this request from another origin (see the module docstring)."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.strip().lower() not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin.strip()).netloc.lower() != headers.get("host", "").strip().lower()


def strict_cookie(value: str, max_age_s: int) -> str:
    """A login ``Set-Cookie`` value made ``SameSite=Strict`` with ``Max-Age=max_age_s``."""
    name_value, *attrs = [part.strip() for part in value.split(";")]
    kept = [a for a in attrs if a.split("=", 1)[0].strip().lower() not in ("samesite", "max-age", "expires")]
    return "; ".join([name_value, *kept, f"Max-Age={max_age_s}", "SameSite=Strict"])


class OperatorGuard:
    """Cross-site refusals, login cookies that end, and the guess throttle for ``/admin``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        dashboard_path: str,
        throttle: GuessThrottle,
        addresses: AddressPolicy,
        session_s: float = SESSION_S,
    ) -> None:
        self.app = app
        self.dashboard_path = dashboard_path.rstrip("/")
        self.logins = (f"{self.dashboard_path}/login", f"{self.dashboard_path}/login/")
        self.throttle = throttle
        self.addresses = addresses
        self.session_s = int(session_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != ADMIN_PREFIX and not path.startswith(ADMIN_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        if path == self.dashboard_path:  # /admin/ui works without its trailing slash
            query = scope.get("query_string", b"").decode("latin-1")
            await RedirectResponse(path + "/" + (f"?{query}" if query else ""), 307)(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method = scope["method"]
        if method not in SAFE_METHODS and cross_site(headers):
            await JSONResponse(
                {
                    "title": CROSS_SITE,
                    "message": (
                        "the dashboard and the admin API answer only their own page; this request came "
                        "from another site"
                    ),
                },
                403,
            )(scope, receive, send)
            return
        on_dashboard = path.startswith(self.dashboard_path + "/")
        login = method == "POST" and path in self.logins
        if not login and on_dashboard:  # the page itself: its login cookie is Gradio's to check
            await self.app(scope, receive, send)
            return
        address = self.addresses.client_address((scope.get("client") or ("", 0))[0], headers.get("x-forwarded-for"))
        if self.throttle.retry_after(address) > 0:
            wait = self.throttle.retry_after_whole_s(address)
            await JSONResponse(
                {
                    "title": RATE_LIMITED,
                    "message": (f"too many wrong admin tokens or passwords from this address. Retry in {wait} s."),
                },
                429,
                headers={"Retry-After": str(wait)},
            )(scope, receive, send)
            return
        wrong = 400 if login else 401  # what Gradio's /login and the admin API answer a wrong secret

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == wrong:
                    self.throttle.failed(address)
                elif login:
                    out = MutableHeaders(scope=message)
                    cookies = out.getlist("set-cookie")
                    del out["set-cookie"]
                    for cookie in cookies:
                        ours = cookie.lstrip().startswith(LOGIN_COOKIE)
                        out.append("set-cookie", strict_cookie(cookie, self.session_s) if ours else cookie)
            await send(message)

        await self.app(scope, receive, watch)
