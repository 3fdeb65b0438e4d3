"""What both tiers import: the request schema and its limits, the hop's types, settings,
header names, errors."""

from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.errors import (
    BACKEND_UNAVAILABLE,
    GPU_ERROR,
    QUEUE_FULL,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    BackendUnavailable,
    GpuFailed,
    SplitspaceError,
    Throttled,
    Unauthorized,
    ValidationFailed,
)
from splitspace.shared.contract.headers import IDENTITY_HEADER, IP_TOKEN_HEADER, SESSION_COOKIE
from splitspace.shared.contract.hop import CallUpdate, Status, call_update_from_wire, error_to_wire
from splitspace.shared.contract.quotas import QuotaConfig, QuotaFileError, Tier, load_quotas, parse_quotas
from splitspace.shared.contract.schema import (
    REQUEST_FIELDS,
    GenerateRequest,
    Limits,
    request_from_dict,
    validate_request,
)

__all__ = [
    "BACKEND_UNAVAILABLE",
    "GPU_ERROR",
    "QUEUE_FULL",
    "QUOTA_EXCEEDED",
    "RATE_LIMITED",
    "BackendUnavailable",
    "GpuFailed",
    "SplitspaceError",
    "Throttled",
    "Unauthorized",
    "ValidationFailed",
    "IDENTITY_HEADER",
    "IP_TOKEN_HEADER",
    "SESSION_COOKIE",
    "CallUpdate",
    "Status",
    "call_update_from_wire",
    "error_to_wire",
    "QuotaConfig",
    "QuotaFileError",
    "Tier",
    "load_quotas",
    "parse_quotas",
    "REQUEST_FIELDS",
    "GenerateRequest",
    "Limits",
    "request_from_dict",
    "validate_request",
    "Settings",
]
