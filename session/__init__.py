"""Client identity: session cookies, API keys, and the signed token that crosses tiers."""

from .address import client_address
from .cookie import SessionCookieMiddleware, SessionCookies
from .identity import Identity
from .keys import ApiKeyring, hash_key
from .resolve import IdentityResolver
from .token import IdentityTokens

__all__ = [
    "ApiKeyring", "Identity", "IdentityResolver", "IdentityTokens",
    "SessionCookieMiddleware", "SessionCookies", "client_address", "hash_key",
]
