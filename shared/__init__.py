"""What both tiers import: the request schema and its limits, settings, header names, errors."""

from .errors import (
    BACKEND_UNAVAILABLE,
    QUEUE_FULL,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    BackendUnavailable,
    SplitspaceError,
    Throttled,
    Unauthorized,
    ValidationFailed,
)
from .headers import IDENTITY_HEADER, IP_TOKEN_HEADER, SESSION_COOKIE
from .quotas import QuotaConfig, QuotaFileError, Tier, load_quotas, parse_quotas
from .schema import GenerateInfo, GenerateRequest, Limits, request_from_dict, validate_request
from .settings import Settings

__all__ = [
    "BACKEND_UNAVAILABLE", "QUEUE_FULL", "QUOTA_EXCEEDED", "RATE_LIMITED",
    "BackendUnavailable", "SplitspaceError", "Throttled", "Unauthorized", "ValidationFailed",
    "IDENTITY_HEADER", "IP_TOKEN_HEADER", "SESSION_COOKIE",
    "QuotaConfig", "QuotaFileError", "Tier", "load_quotas", "parse_quotas",
    "GenerateInfo", "GenerateRequest", "Limits", "request_from_dict", "validate_request",
    "Settings",
]
