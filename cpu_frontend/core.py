"""The CPU tier's core: who a caller is, validation, the fair door, the hop; no Gradio.

Why it exists: every way in (the Gradio handlers of ``app.py``, the durable jobs of
``jobs/routes.py``, OpenAI's images API of ``api/openai_images.py``, the door's
middleware) goes through this one class, so identity, validation, the in-flight caps
and forwarding are decided once. It takes a Starlette ``Request`` and raises the
project's errors (``shared/contract/errors.py``); each edge maps them once, in its own
shape (``gr.Error`` for Gradio, ``{"title", "message"}`` for ``/v1/jobs``, OpenAI's
error body for ``/v1/images``).

A request is resolved to an identity (API key, session cookie, address), validated,
checked against the client's in-flight cap, and forwarded with a freshly minted
identity token and the caller's ``x-ip-token``, as per-call headers. A caller who
goes away closes the stream to the GPU tier, which drops the queued job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection

from splitspace.cpu_frontend.api.validation import validate_call
from splitspace.cpu_frontend.door.door import FairDoor, Place
from splitspace.cpu_frontend.door.door_middleware import DOOR_PASS_HEADER
from splitspace.cpu_frontend.door.inflight_ledger import open_ledger
from splitspace.cpu_frontend.door.limits import InflightCaps
from splitspace.cpu_frontend.door.status_feed import Told, wait_turn
from splitspace.cpu_frontend.hop.backends import BackendPool
from splitspace.cpu_frontend.hop.direct_transport import DirectTransport
from splitspace.cpu_frontend.hop.hub_auth import backend_auth_headers
from splitspace.cpu_frontend.hop.transport import Transport
from splitspace.session import (
    ApiKeyring,
    Identity,
    IdentityResolver,
    IdentityTokens,
    SessionCookies,
)
from splitspace.session.address import AddressPolicy
from splitspace.session.caller import CallerStamps
from splitspace.session.token import HEALTH, STANDING, call_purpose
from splitspace.shared.app.files import (
    BadFile,
    FileTooLarge,
    carries_files,
    expire_files,
    expire_files_every,
    inline_files,
    outline_files,
)
from splitspace.shared.app.loader import GpuEndpoint
from splitspace.shared.app.processing import input_label
from splitspace.shared.config.quota_watch import QuotaWatcher
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.calls import Call, CallResult, Partial
from splitspace.shared.contract.errors import GpuFailed, SplitspaceError, ValidationFailed
from splitspace.shared.contract.headers import IDENTITY_HEADER, IP_TOKEN_HEADER
from splitspace.shared.contract.hop import Status
from splitspace.shared.contract.quotas import QuotaConfig

log = logging.getLogger("splitspace.frontend")

FRONTEND_IDENTITY = Identity("frontend", "address", "anonymous", "frontend")
"""Who the frontend is when it asks a GPU tier for its live caps (health checks)."""
IMAGE_NAME = "image.png"
"""The file name of an image output in this tier's cache: the built-in's ``generate`` answers
a ``gr.Image(format="png")``, which Gradio writes as ``image.png`` on the GPU tier, and its
file lands here under that name (``<cache>/<sha256>/image.png``: ``shared/app/files.py``
``land_bytes``). The sweep of :func:`expire_images` looks for this name."""
IMAGE_SWEEP_S = 60.0
"""How often images older than ``SPLITSPACE_JOB_TTL_S`` are deleted (:func:`expire_images`)."""


@dataclass(frozen=True)
class CheckedCall:
    """A call validated (``validate_call``), its files carried as bytes, and its digest: what
    :meth:`FrontendCore.follow_call` forwards. An edge that must answer a refused input
    before it takes places at the door checks first (:meth:`FrontendCore.check_call`)."""

    call: Call
    digest: str


def build_transports(settings: Settings) -> list[Transport]:
    """One direct transport per GPU tier URL (settings read here, at the edge)."""
    auth = backend_auth_headers(settings.hf_token.get_secret_value() if settings.hf_token else None)
    return [DirectTransport(u, timeout_s=settings.backend_timeout_s, auth_headers=auth) for u in settings.backend_urls]


class FrontendCore:
    """Everything the CPU tier holds, built once from settings, and its ways through."""

    def __init__(self, settings: Settings, cache_dir: str, transports: list[Transport] | None = None) -> None:
        """``cache_dir``: where outputs land as files (Gradio's cache: it serves them)."""
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
        self.cache_dir = cache_dir

    def learn_gpu_s(self, gpu_s: float) -> None:
        """A finished call's measured GPU seconds into :attr:`seconds_per_job` (smoothed): the
        one rule, for the Gradio path and jobs alike (``jobs/targets.py``)."""
        self.seconds_per_job += 0.1 * (gpu_s - self.seconds_per_job)

    def _on_quotas(self, config: QuotaConfig) -> None:
        self.resolver.keyring = ApiKeyring(config.keys)

    async def start(self) -> None:
        """Connect the shared in-flight counts and start watching the GPU tiers' health."""
        await self.ledger.start()
        await self.pool.start()

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.ledger.aclose()

    async def watch_quotas(self) -> None:
        """Reload the quota file when it changes (runs for the app's lifetime)."""
        while True:
            await asyncio.sleep(1.0)
            self.watcher.check()

    def identity(self, request: HTTPConnection | None) -> Identity:
        """Who a caller is, by its headers, cookies and peer address (the same for a Gradio
        handler's request, the door's middleware's and the HTTP APIs')."""
        if request is None:
            raise SplitspaceError("no request context", title="Error")
        peer = request.client.host if request.client else None
        return self.resolver.resolve(request.headers, request.cookies, peer)

    def forward_headers(self, identity: Identity, request: HTTPConnection, purpose: str) -> dict[str, str]:
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

    async def check_call(self, endpoint: GpuEndpoint, payloads: list[Any], *, validated: bool = False) -> CheckedCall:
        """The call these payloads make, checked; ``ValidationFailed`` (``InputRefused``)
        naming the input. One trip off the loop: the checks (with a ``validator=``, an image
        decoded), each file read and hashed. ``validated``: the checks ran already (Gradio
        ran the event's validator, the frontend's, when it queued the call): only the files
        and the digest are left."""
        return await asyncio.to_thread(checked_call, endpoint, payloads, self.settings.max_file_bytes, validated)

    async def follow_call(
        self,
        endpoint: GpuEndpoint,
        payloads: list[Any] | CheckedCall,
        request: HTTPConnection | None,
        *,
        validated: bool = False,
    ) -> AsyncGenerator[Status | list[Any], None]:
        """A call of the developer's GPU function (``ui/app_events.py``): validate (unless
        checked already), join the door, forward; its statuses (its place at the door, then at
        the GPU tier), then its outputs (one payload per output component, files in this tier's
        cache): a generator's each yield as it arrives (a Partial), its last as the result (not twice)."""
        identity = self.identity(request)
        assert request is not None  # (identity() refuses a call without one)
        max_bytes = self.settings.max_file_bytes
        checked = (
            payloads
            if isinstance(payloads, CheckedCall)
            else await self.check_call(endpoint, payloads, validated=validated)
        )
        call, digest = checked.call, checked.digest
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
            updates = self.pool.call(call, self.forward_headers(identity, request, call_purpose(digest)))
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
            self.learn_gpu_s(result.info.gpu_s)
            if result.data != last_partial:  # a stream's last yield came as a Partial already
                yield await self._landed(result.data, max_bytes)

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

    async def quota(self, request: HTTPConnection | None) -> dict[str, Any]:
        """``/quota``: the caller's own standing, as the GPU tier counts it."""
        identity = self.identity(request)
        assert request is not None  # (identity() refuses a call without one)
        result = await self.pool.standing(self.forward_headers(identity, request, STANDING))
        return {**result, "in_flight_here": self.door.count(identity.flow_id)}


def expire_images(cache_dir: str, age_s: float, now: float | None = None) -> int:
    """Delete the images in the cache (``<cache>/<hash>/image.png``: :data:`IMAGE_NAME`)
    written or landed more than ``age_s`` ago (the same image landed again is touched
    again); how many. The OpenAI API's ``response_format="url"`` hands out their URLs: they
    live as long as a job's results (``SPLITSPACE_JOB_TTL_S``), not forever."""
    return expire_files(cache_dir, f"*/{IMAGE_NAME}", age_s, now)


def expire_images_every(cache_dir: str, age_s: float) -> Coroutine[None, None, None]:
    """:func:`expire_images` now and then (from the lifespan), off the event loop."""
    return expire_files_every(cache_dir, f"*/{IMAGE_NAME}", age_s, IMAGE_SWEEP_S)


def checked_call(endpoint: GpuEndpoint, payloads: list[Any], max_bytes: int, validated: bool = False) -> CheckedCall:
    """The call these payloads make, checked (``validate_call``, unless ``validated``), its
    files carried, and its digest (blocking: for a thread). The one check of a call, for
    Gradio's API, OpenAI's images API and durable jobs alike."""
    if not validated:
        validate_call(endpoint, payloads, max_bytes)
    call = Call(endpoint.api_name, _carried(endpoint, payloads, max_bytes))
    try:
        return CheckedCall(call, call.digest())
    except (TypeError, ValueError):  # NaN, or a gr.State holding what JSON cannot say
        raise ValidationFailed("data", "must be plain JSON (no NaN, infinity or Python objects)") from None


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
