"""Gradio's MCP server, made to call this process and to carry the real caller's address.

Why it exists: a queued MCP tool call is run by Gradio through a
``gradio_client`` that calls the app again over HTTP, with the MCP request's
headers (gradio 6.31, ``mcp.py``). Mounted with ``mount_gradio_app``, that
client's URL (``_local_url``) is never set, so Gradio builds it from the
*first* MCP caller's ``X-Forwarded-Host`` or ``Host`` header and keeps it:
one caller decided where every later caller's calls, API keys and cookies
went. And on that loopback call the peer is 127.0.0.1, so every anonymous MCP
caller was one client, or (with uvicorn believing ``X-Forwarded-For`` from
loopback) any caller could name its own address.

:class:`McpLoopback`, a pure ASGI layer in front of the frontend, fixes both on
each request to the MCP endpoint, before Gradio sees it:

- it points Gradio's MCP client at this process: ``http://HOST:PORT/`` of the
  socket the request arrived on (``scope["server"]``, the server's own
  address, which no header can change);
- it replaces any ``X-Splitspace-Caller`` header with a fresh stamp
  (``session/caller.py``) of the caller's address, resolved by the frontend's
  own proxy rule; Gradio forwards it on the loopback call, where the identity
  resolver believes it (from a loopback peer only).

And on the requests of Gradio's own MCP client (from loopback, ``x-gradio-user:
mcp``) it drops ``Set-Cookie``: that one client serves every MCP caller and
keeps the cookies of its first ``/config`` reply, so a session cookie minted
for it would make every MCP caller without a cookie of its own one session.
This layer must be the outermost (added last), outside the cookie middleware.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitspace.session.caller import CallerStamps
from splitspace.session.resolve import IdentityResolver
from splitspace.shared.contract.headers import CALLER_HEADER

MCP_PATH = "/gradio_api/mcp"
_CALLER = CALLER_HEADER.encode()


def local_url(server: tuple[str, int | None] | None) -> str | None:
    """``http://HOST:PORT/`` of the socket a request arrived on (IPv6 in brackets)."""
    if not server or server[1] is None:
        return None
    host, port = server
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class McpLoopback:
    """See the module docstring. ``blocks``: the frontend's ``gr.Blocks`` (its MCP server
    object is looked up per request: Gradio creates it when the app is mounted)."""

    def __init__(self, app: ASGIApp, *, blocks: Any, resolver: IdentityResolver, stamps: CallerStamps) -> None:
        if not stamps.configured:
            raise ValueError("McpLoopback needs the tiers' secret to sign caller stamps")
        self.app = app
        self.blocks = blocks
        self.resolver = resolver
        self.stamps = stamps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(MCP_PATH):
            scope = self._prepare(scope)
        elif scope["type"] == "http" and _from_gradio_mcp_client(scope):
            send = _without_set_cookie(send)
        await self.app(scope, receive, send)

    def _prepare(self, scope: Scope) -> Scope:
        server = getattr(self.blocks, "mcp_server_obj", None)
        if server is not None and server.local_url is None:
            server._local_url = local_url(scope.get("server"))
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != _CALLER]
        as_text = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
        client = scope.get("client")
        peer = client[0] if client else None
        address = self.resolver.addresses.client_address(peer, as_text.get("x-forwarded-for"))
        stamp = self.stamps.stamp(address)
        if stamp is not None:
            headers.append((_CALLER, stamp.encode("latin-1")))
        return {**scope, "headers": headers}


def _from_gradio_mcp_client(scope: Scope) -> bool:
    client = scope.get("client")
    if not client or not _is_loopback(client[0]):
        return False
    return any(k.lower() == b"x-gradio-user" and v == b"mcp" for k, v in scope.get("headers", []))


def _is_loopback(host: str) -> bool:
    return host == "::1" or host.startswith("127.")


def _without_set_cookie(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"set-cookie"]
            message = {**message, "headers": headers}
        await send(message)

    return wrapped
