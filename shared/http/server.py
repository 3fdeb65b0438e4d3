"""How both tiers are served by uvicorn: one set of options, and a header deadline.

:func:`uvicorn_options` is what ``deploy/serve.py`` (``splitspace backend|frontend|dev``)
and the Spaces bundles pass to ``uvicorn.run``:

- ``proxy_headers=False``: uvicorn must not rewrite the client address from
  ``X-Forwarded-For`` (by default it believes that header from 127.0.0.1, which
  let any MCP caller choose its address). splitspace alone judges forwarded
  headers, by the trusted-proxy settings (``session/address.py``).
- ``timeout_keep_alive``: an idle keep-alive connection is closed after 20 s:
  longer than common clients keep one idle (httpx 5 s, aiohttp 15 s), so that a
  client does not reuse a connection just as the tier closes it. At uvicorn's
  5 s, equal to httpx's, that race lost requests under a crowd (issue 10).
- a header deadline (below): a connection whose request line and headers take
  over 10 s is closed. Bodies have their own deadline in the app (``shared/http/guard.py``).
- logging with a cap on every handler (``shared/config/logs.py``), and no access log:
  at INFO a refused request gets one line, the guard's (``shared/http/guard.py``),
  which says why; a reverse proxy in front logs every request anyway.

The header deadline: slow clients cannot hold sockets forever.

uvicorn (0.54) closes an idle keep-alive connection after ``timeout_keep_alive``,
but it has no deadline for the request line and headers: a client that
connects and sends nothing, or one header byte every few seconds (slowloris),
keeps its socket and its buffers for as long as it likes. The body is the
app's to read (``shared/http/guard.py`` gives it a deadline); the headers are read
before any ASGI app runs, so the deadline has to live in the protocol.

:class:`HeaderTimeoutProtocol` is uvicorn's own httptools protocol with one
timer: armed when a connection opens and when a new request begins on it,
cancelled when the headers are complete; when it fires on a connection with
no request in progress, the connection is closed. It also bounds the size of
the request line and headers (httptools buffers any size: a 10 MB header was
accepted): over 64 KiB, the answer is 431 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from fastapi import FastAPI

from splitspace.shared.config.logs import uvicorn_log_config

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without httptools (plain ``uvicorn``, not ``uvicorn[standard]``)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

KEEP_ALIVE_S = 20
HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 * 1024
TOO_LARGE_HEADERS = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: 75\r\nconnection: close\r\n\r\n"
    b'{"title": "Request too large", "message": "headers must be at most 64 KiB"}'
)
PROTOCOL = "splitspace.shared.http.server:HeaderTimeoutProtocol" if HttpToolsProtocol is not None else "auto"
"""What to give uvicorn's ``http=`` (an import string survives ``--reload``'s subprocess). Without
httptools there is no header deadline (uvicorn's h11 protocol has no hook for one)."""


class HeaderTimeoutProtocol(HttpToolsProtocol or object):  # type: ignore[misc]
    """HttpToolsProtocol that closes a connection whose headers take over ``header_timeout_s``
    and answers 431 to headers over ``max_header_bytes`` (httptools buffers any size)."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    max_header_bytes: int = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._reading_headers = True
        self._completed_headers = False
        self._header_bytes = 0  # the parsed request line and headers
        self._unparsed_bytes = 0  # chunks of a head not yet complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_header_timer()  # a request is in progress (a pipelined one waits): look again later
            return
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        counting = self._reading_headers
        self._completed_headers = False
        super().data_received(data)
        # all of this chunk was request line and headers (not when a head completed in it: a
        # small request with its body in one chunk may even have begun the next request)
        if counting and self._reading_headers and not self._completed_headers:
            self._unparsed_bytes += len(data)  # a head still incomplete: count what it has sent
            if self._unparsed_bytes > self.max_header_bytes and not self.transport.is_closing():
                self.transport.write(TOO_LARGE_HEADERS)
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._completed_headers = True
        self._reading_headers = False
        if self._header_bytes > self.max_header_bytes:  # a whole head that came in one chunk
            self.transport.write(TOO_LARGE_HEADERS)
            self.transport.close()
            return
        self._header_bytes = self._unparsed_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_headers = True  # what comes next on this connection is another request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def uvicorn_options(log_level: str = "warning") -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` (see the module docstring)."""
    return dict(
        log_level=log_level,
        log_config=uvicorn_log_config(log_level),
        timeout_graceful_shutdown=2,
        proxy_headers=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        http=PROTOCOL,
        server_header=False,
        access_log=False,  # one line per refused request is the guard's (shared/http/guard.py); a proxy logs requests
    )


NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)
"""Keyword arguments for both tiers' FastAPI apps and the Gradio apps they mount.

FastAPI's native OpenTelemetry (0.16x) asks, on every request, whether a tracer, meter
or logger provider is configured: three ``os.environ`` lookups that were 8% of the
frontend's CPU for taking in a REST call under a crowd (issue 10). splitspace exports
no traces; with telemetry off the check stops at the first ``False``. (Empty for a
FastAPI without the option.)"""
