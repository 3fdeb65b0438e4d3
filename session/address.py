"""The caller's address, honouring a configured number of trusted proxies.

Each trusted proxy appends the address it saw to ``X-Forwarded-For``; the
client's address is the entry that the outermost trusted proxy appended.
With no trusted proxies the header is ignored (anyone can write it).
"""

from __future__ import annotations


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: int) -> str:
    if trusted_proxies > 0 and forwarded_for:
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        if hops:
            return hops[max(0, len(hops) - trusted_proxies)]
    return peer or "unknown"
