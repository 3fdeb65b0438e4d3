"""The one way into the GPU tier: verify, validate, count, admit, follow, map failures.

Two routes reach it, and both are thin adapters over this class: Gradio's
``/infer`` (for ``gradio_client`` and any Gradio client, in ``app.py``) and the
direct route (``direct_route.py``, the frontend's default hop; it also takes the
calls of a developer's ``@splitspace.gpu`` functions, :meth:`InferService.enter_call`).
Each rule is written here once, so the doors cannot drift apart:

- the identity token is verified before anything else (a refusal is counted);
- the request is validated again with the same schema as the frontend's
  (the GPU tier trusts nothing);
- admission (limits, fair queue) is the runner's, and refuses with Throttled; with
  Redis (``SPLITSPACE_REDIS_URL``) the limits every replica shares are checked first,
  in :mod:`gpu_backend.stores.global_limits` (:meth:`InferService.enter`, which both routes
  call), and a store that cannot answer refuses with ServiceUnavailable;
- whatever goes wrong in the model (or a developer's function) becomes a ``GpuFailed``
  that names only the exception type, logged once here; a ``gr.Error`` (ZeroGPU's own,
  e.g. "ZeroGPU quota exceeded", or one a developer's function raised) is passed on
  with its title.

Everything it raises is a :class:`~shared.contract.errors.SplitspaceError`; the routes
turn it into their protocol's error (an error line, an HTTP status, a
``gr.Error``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import gradio as gr

from splitspace.gpu_backend.admission.runner import GpuRunner, RunnerUpdate, Ticket, client_ref
from splitspace.gpu_backend.stores.global_limits import GlobalLimits
from splitspace.gpu_backend.workload.app_functions import AppFunction
from splitspace.gpu_backend.workload.work import Work
from splitspace.session.identity import Identity
from splitspace.session.token import STANDING, Claims, IdentityTokens, infer_purpose
from splitspace.shared.contract.calls import Call
from splitspace.shared.contract.errors import (
    GPU_ERROR,
    QUEUE_FULL,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    GpuFailed,
    SplitspaceError,
    Throttled,
    Unauthorized,
    UnknownEndpoint,
    ValidationFailed,
)
from splitspace.shared.contract.schema import GenerateRequest, Limits, echo, request_from_dict

log = logging.getLogger("splitspace.gpu")

_REASONS = {QUEUE_FULL: "queue_full", QUOTA_EXCEEDED: "quota_exceeded", RATE_LIMITED: "rate_limited"}


class InferService:
    def __init__(
        self,
        *,
        tokens: IdentityTokens,
        runner: GpuRunner,
        limits: Limits,
        standing: Callable[[Identity], dict[str, Any]],
        on_call: Callable[[], None] = lambda: None,
        on_refused: Callable[[str], None] = lambda reason: None,
        global_limits: GlobalLimits | None = None,
        functions: Mapping[str, AppFunction] | None = None,
        on_function_call: Callable[[str], None] = lambda endpoint: None,
    ) -> None:
        """``functions``: the developer's GPU functions by API name (a GPU tier serving an
        app; then ``runner`` has no built-in model). ``on_function_call``: a call of one of
        them arrived (its name), before its inputs are read."""
        self.global_limits = global_limits
        self.functions = dict(functions or {})
        self._on_function_call = on_function_call
        self.tokens = tokens
        self.runner = runner
        self.limits = limits
        self._standing = standing
        self._on_call = on_call
        self._on_refused = on_refused

    def verify(self, token: str | None, purpose: str | None = None) -> Claims:
        """The token's claims (and, given ``purpose``, checked against it), or
        Unauthorized (counted)."""
        try:
            claims = self.tokens.verify(token)
            if purpose is not None:
                claims.require(purpose)
            return claims
        except SplitspaceError:
            self._on_refused("unauthorized")
            raise

    def arrive(self, token: str | None) -> Claims:
        """A call to ``/infer`` arrived: count it and verify its token, before its body is read."""
        self._on_call()
        return self.verify(token)

    def admit(self, claims: Claims, body: Mapping[str, Any], ip_token: str | None = None) -> Ticket:
        """Validate and admit one call; raises ValidationFailed, Unauthorized (a token
        issued for another request) or Throttled at once. The ticket must be followed
        (:meth:`follow`) or dropped. ``ip_token``: the visitor's ZeroGPU token (on ZeroGPU a
        batch holds one visitor's requests)."""
        request, identity = self._request(claims, body)
        return self.runner.admit(identity, request, ip_token)

    async def enter(self, claims: Claims, body: Mapping[str, Any], ip_token: str | None = None) -> Ticket:
        """:meth:`admit` for the routes: the global limits first when there are any
        (Redis), then the runner's. Raises what :meth:`admit` raises, ServiceUnavailable
        while the shared store cannot check a limit (``closed``), and Unauthorized when
        another replica already admitted this token's call (its nonce, in Redis)."""
        if self.global_limits is None:
            return self.admit(claims, body, ip_token)
        request, identity = self._request(claims, body)
        # the estimate the gate checks is the one the job keeps
        return await self._enter(claims, identity, self.runner.prepare(request), ip_token)

    async def enter_call(self, claims: Claims, call: Call, ip_token: str | None = None) -> Ticket:
        """Admit a call of one of the developer's functions, by the rules of :meth:`enter`:
        UnknownEndpoint (naming it) for a function this tier does not serve, Unauthorized
        for a token issued for another call, ValidationFailed naming the input that cannot
        be read; then the global limits and the one fair queue that every call shares, at
        the cost the function's ``duration`` gives. Its inputs are read off the event loop."""
        function = self.functions.get(call.endpoint)
        if function is None:
            known = ", ".join(sorted(self.functions)) or "none"
            raise UnknownEndpoint(f"no function named {echo(call.endpoint)} (functions: {known})")
        self._on_function_call(call.endpoint)
        try:
            digest = await asyncio.to_thread(call.digest)  # the inputs may be megabytes of files
        except ValueError:  # NaN or infinity: not JSON the frontend could have signed
            raise ValidationFailed("data", "must be plain JSON (no NaN or infinity)") from None
        identity = self._identity(claims, digest)
        work = await asyncio.to_thread(function.prepare, call)
        return await self._enter(claims, identity, work, ip_token)

    async def _enter(self, claims: Claims, identity: Identity, work: Work[Any], ip_token: str | None) -> Ticket:
        gate = self.global_limits
        if gate is None:
            return self.runner.admit_work(identity, work, ip_token)
        job_id = uuid.uuid4().hex
        try:  # the token's nonce too: a call replayed to another replica is refused there
            hold = await gate.admit(client_ref(identity), job_id, work.cost, claims.nonce, self.tokens.replay_window_s)
        except Throttled as exc:
            self._on_refused(_REASONS.get(exc.title, "throttled"))
            raise
        except Unauthorized:
            self._on_refused("unauthorized")
            raise
        except SplitspaceError:
            self._on_refused("store_unavailable")
            raise
        try:
            return self.runner.admit_work(identity, work, ip_token, job_id=job_id)
        except BaseException:
            gate.refused_locally(hold)
            raise

    def _request(self, claims: Claims, body: Mapping[str, Any]) -> tuple[GenerateRequest, Identity]:
        """The built-in's request, validated, and the identity its token was issued for."""
        self.runner.text_to_image()  # UnknownEndpoint on a tier that serves an app instead
        request = request_from_dict(dict(body), self.limits)
        return request, self._identity(claims, request.digest())

    def _identity(self, claims: Claims, digest: str) -> Identity:
        try:
            return claims.require(infer_purpose(digest))
        except SplitspaceError:
            self._on_refused("unauthorized")
            raise

    async def follow(self, ticket: Ticket) -> AsyncGenerator[RunnerUpdate, None]:
        """The ticket's updates, ending with its answer (a Result, or a CallResult for a
        developer's function); closing this drops a waiting job."""
        updates = self.runner.follow(ticket)
        try:
            async for update in updates:
                yield update
        except SplitspaceError:
            raise
        except gr.Error as exc:  # ZeroGPU's own errors, or a function's: passed on as they are
            raise SplitspaceError(str(exc.message), title=exc.title or GPU_ERROR) from None
        except Exception as exc:  # the model failed: say so, without internals
            failed = ticket.waiter.work.workload.failure
            log.exception("%s failed", failed)
            raise GpuFailed(f"{failed} failed ({type(exc).__name__})") from None
        finally:
            await updates.aclose()

    def drop(self, ticket: Ticket) -> None:
        self.runner.drop(ticket)

    def standing(self, token: str | None) -> dict[str, Any]:
        """The caller's own quota standing."""
        return self._standing(self.verify(token, STANDING).identity)
