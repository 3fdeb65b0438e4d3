"""The operators' admin API on the GPU tier (``/admin/...``), behind ``SPLITSPACE_ADMIN_TOKEN``.

The token travels in ``X-Splitspace-Admin`` (or ``Authorization: Bearer`` where no
Hub proxy needs that header).
With no token configured the whole API answers 404: disabled, not open.
Overrides (``gpu_backend/admission/limits.py``) apply to the next dispatch.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import APIRouter, Body, Depends, HTTPException, Request

from splitspace.gpu_backend.admission.limits import Overrides
from splitspace.gpu_backend.admission.scheduler import ClientRef, FairScheduler, address_usage_key
from splitspace.gpu_backend.stores.usage import UsageLedger
from splitspace.shared.contract.admin_api import ClientStanding, QuotaStatus
from splitspace.shared.contract.headers import ADMIN_HEADER
from splitspace.shared.contract.quotas import QuotaConfig, QuotaFileError, validate_overrides

if TYPE_CHECKING:
    from splitspace.gpu_backend.stores.global_limits import GlobalLimits
    from splitspace.gpu_backend.stores.resilient_store import ResilientStore

T = TypeVar("T")


class SchedulerRead(Protocol):
    """Runs a read of the scheduler under the runner's lock (``GpuTier.with_scheduler``)."""

    def __call__(self, read: Callable[[FairScheduler], T], /) -> T: ...


def admin_router(
    *,
    token: str | None,
    read: SchedulerRead,
    store: UsageLedger | ResilientStore,
    overrides: Overrides,
    config: Callable[[], QuotaConfig],
    quota_status: Callable[[], QuotaStatus],
    global_limits: GlobalLimits | None = None,
    extra_routes: Callable[[APIRouter], None] | None = None,
) -> APIRouter:
    def require_admin(request: Request) -> None:
        if not token:
            raise HTTPException(404, "admin API disabled (no SPLITSPACE_ADMIN_TOKEN)")
        # X-Splitspace-Admin first: on a private Space, Authorization carries the Hub token.
        value = request.headers.get(ADMIN_HEADER, "")
        if not value:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            value = value if scheme.lower() == "bearer" else ""
        if not value or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "admin token missing or wrong")

    # Every route has response_model=None: it answers its TypedDict (shared/contract/admin_api.py)
    # as returned. As a response model FastAPI would convert it (a ``used`` of 0 would go out
    # as 0.0) and drop the keys it does not name.
    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    def ref_for(client_id: str) -> ClientRef | str:
        # An API key's tier is the quota file's: a key this process has not seen yet (after a
        # restart, say) must not be shown with the anonymous tier's limits.
        kind, _, name = client_id.partition(":")
        if kind == "key":
            for key in config().keys:
                if key.name == name:
                    return ClientRef(client_id=client_id, kind="key", tier=key.tier, address="")
        return client_id

    def describe(client_id: str) -> ClientStanding:
        ref = ref_for(client_id)
        stats = read(lambda s: s.client_stats(ref))
        if global_limits is not None:  # usage and slots of every replica, from the store
            kind = stats["kind"]
            address = client_id.removeprefix("addr:") if kind == "address" else ""
            stats = global_limits.global_stats(stats, ClientRef(client_id, kind, stats["tier"], address))
        values = overrides.get(client_id)
        tier = config().tier_name(client_id, stats["tier"], values)
        return {**stats, "client": client_id, "overrides": values, "tier": tier}

    @router.get("/clients", response_model=None)
    async def list_clients() -> list[ClientStanding]:
        ids = {c["client"] for c in read(FairScheduler.clients)} | set(overrides.all())
        if global_limits is not None:  # clients queued, running or with usage on any replica
            ids |= {key for key in global_limits.slot_keys() if key.startswith(("key:", "addr:"))}
            ids |= global_limits.used_keys()
        return [describe(cid) for cid in sorted(ids)]

    @router.get("/clients/{client_id:path}", response_model=None)
    async def show_client(client_id: str) -> ClientStanding:
        return describe(client_id)

    @router.put("/clients/{client_id:path}", response_model=None)
    async def set_client(client_id: str, values: dict[str, Any] = Body(...)) -> ClientStanding:
        try:
            checked = validate_overrides(values, config())
        except QuotaFileError as exc:
            raise HTTPException(422, str(exc)) from None
        if unknown := config().unknown_client(client_id):  # a typo must not create a client
            raise HTTPException(404, unknown)
        overrides.set(client_id, checked)
        return describe(client_id)

    @router.delete("/clients/{client_id:path}", response_model=None)
    async def clear_client(client_id: str) -> ClientStanding:
        overrides.clear(client_id)
        return describe(client_id)

    @router.post("/reset/{client_id:path}", response_model=None)
    async def reset_client(client_id: str) -> ClientStanding:
        store.reset(client_id)
        if client_id.startswith("addr:"):  # an address also resets the ceiling its sessions share
            store.reset(address_usage_key(client_id.removeprefix("addr:")))
        return describe(client_id)

    @router.get("/quotas", response_model=None)
    async def quotas() -> QuotaStatus:
        return quota_status()

    if extra_routes is not None:
        extra_routes(router)
    return router
