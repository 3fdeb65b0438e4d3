"""Resolve who a frontend request belongs to: API key, then session cookie, then address.

An ``Authorization: Bearer`` header that is not a known key is refused, never
downgraded to anonymous (a typo must not silently lose a paid tier). Hugging
Face tokens (``hf_...``) are the Hub's, sent by clients of private Spaces, and
are not ours to judge: they are ignored here.

The address (of every identity: anonymous callers are theirs, sessions and keys
carry it for the per-address ceiling) comes from :class:`AddressPolicy`
(``X-Forwarded-For`` only from trusted proxies, IPv6 by network), or from a
valid caller stamp (``caller.py``) on Gradio's MCP loopback call.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from splitspace.session.address import AddressPolicy
from splitspace.session.caller import CallerStamps
from splitspace.session.cookie import SessionCookies
from splitspace.session.identity import Identity
from splitspace.session.keys import ApiKeyring
from splitspace.shared.contract.errors import Unauthorized
from splitspace.shared.contract.headers import CALLER_HEADER, SESSION_COOKIE
from splitspace.shared.contract.quotas import ANONYMOUS


def _loopback(peer: str | None) -> bool:
    try:
        return peer is not None and ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


class IdentityResolver:
    def __init__(
        self,
        *,
        cookies: SessionCookies,
        keyring: ApiKeyring,
        trusted_proxies: int = 0,
        addresses: AddressPolicy | None = None,
        stamps: CallerStamps | None = None,
        cookie_name: str = SESSION_COOKIE,
    ) -> None:
        self.cookies = cookies
        self.keyring = keyring
        self.addresses = addresses or AddressPolicy(trusted_proxies=trusted_proxies)
        self.stamps = stamps
        self.cookie_name = cookie_name

    def address(self, headers: Mapping[str, str], peer: str | None) -> str:
        """The caller's (grouped) address: a valid caller stamp's, else by the proxy rule."""
        if self.stamps is not None and _loopback(peer):  # stamps only travel from the frontend to itself
            stamped = self.stamps.read(headers.get(CALLER_HEADER))
            if stamped is not None:
                return stamped
        return self.addresses.client_address(peer, headers.get("x-forwarded-for"))

    def resolve(self, headers: Mapping[str, str], cookies: Mapping[str, str], peer: str | None) -> Identity:
        address = self.address(headers, peer)
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
