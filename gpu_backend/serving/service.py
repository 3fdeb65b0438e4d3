"""The one way into the GPU tier: verify, validate, count, admit, follow, map failures.

The direct route's call path (``direct_route.py``, ``POST /splitspace/v1/call``: a call of
one of the app's ``@splitspace.gpu`` functions, the built-in app's ``generate`` included)
is a thin adapter over this class, as is the caller's standing (``/splitspace/v1/standing``).
Each rule is written here once:

- the identity token is verified before anything else (a refusal is counted), and
  bound to the call it came with (:func:`~session.token.call_purpose` of its digest);
- the call's inputs are read again as the function's components read them (the GPU
  tier trusts nothing): an input that cannot be read is a ValidationFailed naming it;
- admission (limits, fair queue) is the runner's, and refuses with Throttled; with
  Redis (``SPLITSPACE_REDIS_URL``) the limits every replica shares are checked first,
  in :mod:`gpu_backend.stores.global_limits`, and a store that cannot answer refuses
  with ServiceUnavailable;
- whatever goes wrong in a function becomes a ``GpuFailed`` that names only the
  exception type, logged once here; a ``gr.Error`` (ZeroGPU's own, e.g. "ZeroGPU quota
  exceeded", or one a function raised) is passed on with its title.

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
from splitspace.session.token import STANDING, Claims, IdentityTokens, call_purpose
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
from splitspace.shared.contract.schema import echo

log = logging.getLogger("splitspace.gpu")

_REASONS = {QUEUE_FULL: "queue_full", QUOTA_EXCEEDED: "quota_exceeded", RATE_LIMITED: "rate_limited"}


class CallService:
    def __init__(
        self,
        *,
        tokens: IdentityTokens,
        runner: GpuRunner,
        standing: Callable[[Identity], dict[str, Any]],
        on_call: Callable[[], None] = lambda: None,
        on_refused: Callable[[str], None] = lambda reason: None,
        global_limits: GlobalLimits | None = None,
        functions: Mapping[str, AppFunction] | None = None,
        on_function_call: Callable[[str], None] = lambda endpoint: None,
    ) -> None:
        """``functions``: the app's GPU functions by API name. ``on_call``: a call arrived,
        before any check; ``on_function_call``: a call of one of them arrived (its name),
        its token verified, before its inputs are read."""
        self.global_limits = global_limits
        self.functions = dict(functions or {})
        self._on_function_call = on_function_call
        self.tokens = tokens
        self.runner = runner
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
        """A call arrived: count it and verify its token, before its body is read."""
        self._on_call()
        return self.verify(token)

    async def enter_call(self, claims: Claims, call: Call, ip_token: str | None = None) -> Ticket:
        """Admit a call of one of the app's functions; the ticket must be followed
        (:meth:`follow`) or dropped. Raises UnknownEndpoint (naming it) for a function this
        tier does not serve, Unauthorized for a token issued for another call (or, with
        Redis, one another replica already admitted: its nonce), ValidationFailed naming
        the input that cannot be read, Throttled when a limit refuses it and
        ServiceUnavailable while the shared store cannot check a limit (``closed``); the
        global limits come first, then the one fair queue that every call shares, at the
        cost the function's ``duration`` gives. Its inputs are read off the event loop.
        ``ip_token``: the visitor's ZeroGPU token (on ZeroGPU a batch holds one visitor's
        calls)."""
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
            return self.runner.admit(identity, work, ip_token)
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
            return self.runner.admit(identity, work, ip_token, job_id=job_id)
        except BaseException:
            gate.refused_locally(hold)
            raise

    def _identity(self, claims: Claims, digest: str) -> Identity:
        try:
            return claims.require(call_purpose(digest))
        except SplitspaceError:
            self._on_refused("unauthorized")
            raise

    async def follow(self, ticket: Ticket) -> AsyncGenerator[RunnerUpdate, None]:
        """The ticket's updates, ending with its answer (a CallResult); closing this drops
        a waiting job."""
        updates = self.runner.follow(ticket)
        try:
            async for update in updates:
                yield update
        except SplitspaceError:
            raise
        except gr.Error as exc:  # ZeroGPU's own errors, or a function's: passed on as they are
            raise SplitspaceError(str(exc.message), title=exc.title or GPU_ERROR) from None
        except Exception as exc:  # the function (or the model it ran) failed: say so, without internals
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
