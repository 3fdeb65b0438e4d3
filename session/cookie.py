"""The browser session cookie, issued by a pure ASGI middleware.

Gradio event handlers cannot set cookies, so the frontend's app is wrapped
in :class:`SessionCookieMiddleware` (in the manner of starlette's
middleware: options checked once, responses edited only by wrapping ``send``
at ``http.response.start``). A request without a valid cookie gets one minted
in its response; the request itself is still its address (a first request
carries no cookie yet).
"""

from __future__ import annotations

import secrets as pysecrets
from collections.abc import Sequence
from http.cookies import SimpleCookie

from itsdangerous import BadSignature, Signer
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitspace.shared.contract.headers import SESSION_COOKIE

COOKIE_SALT = "splitspace.session.v1"
DEFAULT_MAX_AGE_S = 30 * 24 * 3600


class SessionCookies:
    """Sign and read session ids (128 random bits, urlsafe). Newest secret signs, all verify."""

    def __init__(self, secrets: Sequence[str]) -> None:
        keys = [s for s in secrets if s]
        if not keys:
            raise ValueError("session cookies need at least one secret")
        self._signer = Signer(list(reversed(keys)), salt=COOKIE_SALT)

    def mint(self) -> tuple[str, str]:
        """A new session id and its signed cookie value."""
        session_id = pysecrets.token_urlsafe(16)
        return session_id, self._signer.sign(session_id).decode()

    def read(self, value: str | None) -> str | None:
        """The session id in a cookie value, or None when absent or not signed by us."""
        if not value:
            return None
        try:
            return self._signer.unsign(value).decode()
        except BadSignature:
            return None


def _request_is_https(scope: Scope, trust_forwarded_proto: bool) -> bool:
    if scope.get("scheme") in ("https", "wss"):
        return True
    if trust_forwarded_proto:
        for name, value in scope.get("headers", []):
            if name == b"x-forwarded-proto":
                return value.decode("latin-1").split(",")[0].strip() == "https"
    return False


def _cookie_from_scope(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:
                return None
            if name in jar:
                return jar[name].value
    return None


class SessionCookieMiddleware:
    """Set ``splitspace_session`` on responses to requests that lack a valid one.

    ``secure=None`` decides per request: ``Secure; SameSite=None; Partitioned``
    over HTTPS (so the cookie works inside the Hugging Face iframe), ``SameSite=Lax``
    on plain HTTP. ``X-Forwarded-Proto`` is believed only with ``trust_forwarded_proto``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        cookies: SessionCookies,
        cookie_name: str = SESSION_COOKIE,
        max_age_s: int = DEFAULT_MAX_AGE_S,
        secure: bool | None = None,
        trust_forwarded_proto: bool = False,
    ) -> None:
        self.app = app
        self.cookies = cookies
        self.cookie_name = cookie_name
        self.max_age_s = int(max_age_s)
        self.secure = secure
        self.trust_forwarded_proto = trust_forwarded_proto

    def _set_cookie_header(self, value: str, https: bool) -> str:
        parts = [f"{self.cookie_name}={value}", "Path=/", f"Max-Age={self.max_age_s}", "HttpOnly"]
        if https:
            parts += ["Secure", "SameSite=None", "Partitioned"]
        else:
            parts.append("SameSite=Lax")
        return "; ".join(parts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.cookies.read(_cookie_from_scope(scope, self.cookie_name)) is not None:
            await self.app(scope, receive, send)
            return
        https = self.secure if self.secure is not None else _request_is_https(scope, self.trust_forwarded_proto)
        _, signed = self.cookies.mint()
        header = self._set_cookie_header(signed, https)

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("set-cookie", header)
            await send(message)

        await self.app(scope, receive, send_with_cookie)
