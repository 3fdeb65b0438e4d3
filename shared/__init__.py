"""What both tiers import: the request schema and its limits, the hop's types, settings,
header names, errors."""

from .errors import (
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
from .headers import IDENTITY_HEADER, IP_TOKEN_HEADER, SESSION_COOKIE
from .hop import GenerateInfo, Result, Status, Update, error_to_wire, update_from_wire
from .quotas import QuotaConfig, QuotaFileError, Tier, load_quotas, parse_quotas
from .schema import REQUEST_FIELDS, GenerateRequest, Limits, request_from_dict, validate_request
from .settings import Settings

__all__ = [
    "BACKEND_UNAVAILABLE", "GPU_ERROR", "QUEUE_FULL", "QUOTA_EXCEEDED", "RATE_LIMITED",
    "BackendUnavailable", "GpuFailed", "SplitspaceError", "Throttled", "Unauthorized", "ValidationFailed",
    "IDENTITY_HEADER", "IP_TOKEN_HEADER", "SESSION_COOKIE",
    "GenerateInfo", "Result", "Status", "Update", "error_to_wire", "update_from_wire",
    "QuotaConfig", "QuotaFileError", "Tier", "load_quotas", "parse_quotas",
    "REQUEST_FIELDS", "GenerateRequest", "Limits", "request_from_dict", "validate_request",
    "Settings",
]
