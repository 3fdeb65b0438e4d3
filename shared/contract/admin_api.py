"""The JSON of the operators' admin API (``/admin/...`` on the GPU tier), defined once.

Why it exists: the API (``gpu_backend/ops/admin.py``) answers with a client's standing
and the model; ``splitspace quota`` and ``splitspace model`` (``deploy/admin_client.py``)
and the operators' dashboard (``gpu_backend/ops/dashboard.py``) read those answers.
These TypedDicts are that shape for all three, so a key renamed on one side is a type
error on the others. They describe plain JSON objects: nothing is converted or checked
at run time, and the JSON on the wire is what the API always sent.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from splitspace.shared.contract.quotas import OverrideValues, TierLimits


class AddressStanding(TypedDict):
    """The ceiling an anonymous client's address shares with its sessions
    (``address_gpu_seconds``), in its live window."""

    used: float
    remaining: float
    resets_in_s: float


class ClientStats(TypedDict):
    """One client's standing as the scheduler counts it (``FairScheduler.client_stats``;
    with the figures of every replica when the store is shared)."""

    client: str
    """The client id operators name: ``key:NAME``, ``session:ID`` or ``addr:ADDRESS``."""
    client_id: str
    kind: str
    """``key``, ``session`` or ``address``."""
    tier: str
    limits: TierLimits
    """The limits in force: its tier's, after the quota file's and operators' overrides."""
    queued: int
    running: int
    used: float
    """GPU-seconds charged in its live window."""
    remaining: float
    """GPU-seconds left before it is refused (the address's, when that binds first)."""
    resets_in_s: float
    address: NotRequired[AddressStanding]
    """Anonymous clients only, when their tier caps the address."""
    store: NotRequired[Literal["unavailable"]]
    """Present when the shared store could not be read: the figures are this replica's."""


class ClientStanding(ClientStats):
    """A client as ``/admin/clients`` lists it and every change answers it: its
    standing, the tier after overrides, and the operators' overrides in force."""

    overrides: OverrideValues


class QuotaStatus(TypedDict):
    """``GET /admin/quotas``: the quota file in force, and why its last reload failed."""

    path: str | None
    last_error: str | None


class ModelInfo(TypedDict):
    """``GET /admin/model``: the model served (None, with the app and its GPU functions,
    on a GPU tier that serves an app)."""

    model: str | None
    app: NotRequired[str]
    functions: NotRequired[list[str]]


class ModelChange(TypedDict):
    """``PUT /admin/model``: the model now served, and the one it replaced."""

    model: str
    previous: str
