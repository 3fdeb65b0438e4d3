"""Resolve who a frontend request belongs to: API key, then session cookie, then address.

An ``Authorization: Bearer`` header that is not a known key is refused, never
downgraded to anonymous (a typo must not silently lose a paid tier). Hugging
Face tokens (``hf_...``) are the Hub's, sent by clients of private Spaces, and
are not ours to judge: they are ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.errors import Unauthorized
from shared.headers import SESSION_COOKIE
from shared.quotas import ANONYMOUS

from .address import client_address
from .cookie import SessionCookies
from .identity import Identity
from .keys import ApiKeyring


class IdentityResolver:
    def __init__(
        self,
        *,
        cookies: SessionCookies,
        keyring: ApiKeyring,
        trusted_proxies: int = 0,
        cookie_name: str = SESSION_COOKIE,
    ) -> None:
        self.cookies = cookies
        self.keyring = keyring
        self.trusted_proxies = trusted_proxies
        self.cookie_name = cookie_name

    def resolve(
        self, headers: Mapping[str, str], cookies: Mapping[str, str], peer: str | None
    ) -> Identity:
        address = client_address(peer, headers.get("x-forwarded-for"), self.trusted_proxies)
        auth = headers.get("authorization", "").strip()
        if auth:
            scheme, _, raw = auth.partition(" ")
            raw = raw.strip()
            if scheme.lower() != "bearer" or not raw:
                raise Unauthorized("malformed Authorization header; expected 'Bearer <api key>'")
            if not raw.startswith("hf_"):
                key = self.keyring.lookup(raw)
                if key is None:
                    raise Unauthorized("unknown API key")
                return Identity(key.client_id, "key", key.tier, address)
        session_id = self.cookies.read(cookies.get(self.cookie_name))
        if session_id is not None:
            return Identity(f"session:{session_id}", "session", ANONYMOUS, address)
        return Identity(f"addr:{address}", "address", ANONYMOUS, address)
