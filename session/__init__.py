"""Client identity: session cookies, API keys, and the signed token that crosses tiers."""

from splitspace.session.address import client_address
from splitspace.session.cookie import SessionCookieMiddleware, SessionCookies
from splitspace.session.identity import Identity
from splitspace.session.keys import ApiKeyring, hash_key
from splitspace.session.resolve import IdentityResolver
from splitspace.session.token import IdentityTokens

__all__ = [
    "ApiKeyring",
    "Identity",
    "IdentityResolver",
    "IdentityTokens",
    "SessionCookieMiddleware",
    "SessionCookies",
    "client_address",
    "hash_key",
]
