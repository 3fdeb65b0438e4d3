"""The caller's address: ``X-Forwarded-For`` only from trusted proxies, IPv6 grouped by network.

Anyone can write ``X-Forwarded-For``, so it says who the caller is only when
the peer (the TCP connection's own address, which nobody can forge) is a
proxy the operator trusts. The rule (``SPLITSPACE_TRUSTED_PROXY_CIDRS`` and
``SPLITSPACE_TRUSTED_PROXIES``):

- If the peer is not in the trusted networks, the header is ignored: the caller
  is the peer.
- If the peer is trusted and ``trusted_proxies`` is N > 0, the caller is the
  entry the outermost of the N proxies appended: the N-th from the right (the
  first entry when the chain is shorter).
- If the peer is trusted and N is 0, the caller is the rightmost entry that is
  not itself in the trusted networks (every trusted proxy appended one).
- The trusted networks default to loopback and the private ranges
  (:data:`PRIVATE_NETWORKS`) when N > 0 and none are configured: a proxy in
  front of an app is almost always on the same host or a private network (as
  on Hugging Face Spaces), and a caller on the public internet then cannot
  pass for anyone. With N = 0 and no networks configured, the header is never
  read.
- An entry that is not an IP address is not believed: the caller is the peer.

Anonymous callers are grouped by network, not by address, for IPv6: one
subscriber usually holds a whole /64 (and can use any address in it), so
``addr:2001:db8:1:2::/64`` is one client (the prefix is configurable).
IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``) are their IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PRIVATE_NETWORKS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "fe80::/10",
)
"""Loopback, RFC 1918, carrier-grade NAT, unique-local and link-local: the default trusted
networks when a proxy count is set and no networks are."""
DEFAULT_IPV6_PREFIX = 64


def parse_networks(spec: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """Networks from a comma separated string (or a list): ``"10.0.0.0/8, 2001:db8::/32"``.
    A bare address is a one-address network. Raises ValueError naming a bad entry."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    networks = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {part[:60]!r} (expected e.g. 10.0.0.0/8 or 2001:db8::/32)") from None
    return tuple(networks)


def _ip(text: str | None) -> IPAddress | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [2001:db8::1]:443
        text = text[1 : text.index("]")]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: IPAddress | None, networks: Sequence[IPNetwork]) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


class AddressPolicy:
    """Who the caller is, from the peer and ``X-Forwarded-For`` (see the module docstring)."""

    def __init__(
        self,
        *,
        trusted_proxies: int = 0,
        trusted_networks: Sequence[IPNetwork] | str | None = None,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
    ) -> None:
        if trusted_proxies < 0:
            raise ValueError("trusted_proxies must be >= 0")
        if not 1 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be from 1 to 128")
        if isinstance(trusted_networks, str):
            trusted_networks = parse_networks(trusted_networks)
        if not trusted_networks and trusted_proxies > 0:
            trusted_networks = parse_networks(PRIVATE_NETWORKS)
        self.trusted_proxies = trusted_proxies
        self.trusted_networks: tuple[IPNetwork, ...] = tuple(trusted_networks or ())
        self.ipv6_prefix = ipv6_prefix

    def is_trusted(self, address: str | None) -> bool:
        return _trusted(_ip(address), self.trusted_networks)

    def caller_ip(self, peer: str | None, forwarded_for: str | None) -> str:
        """The caller's address as text (not grouped), or ``"unknown"`` without a peer."""
        peer_ip = _ip(peer)
        if peer_ip is None:
            return peer or "unknown"
        if not forwarded_for or not _trusted(peer_ip, self.trusted_networks):
            return str(peer_ip)
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        if not hops:
            return str(peer_ip)
        if self.trusted_proxies > 0:
            chosen = _ip(hops[max(0, len(hops) - self.trusted_proxies)])
        else:
            chosen = None
            for hop in reversed(hops):
                chosen = _ip(hop)
                if chosen is None or not _trusted(chosen, self.trusted_networks):
                    break
        return str(chosen) if chosen is not None else str(peer_ip)

    def group(self, address: str) -> str:
        """The client key of an anonymous caller: an IPv4 address as is, IPv6 by its network."""
        ip = _ip(address)
        if ip is None:
            return address
        if isinstance(ip, ipaddress.IPv6Address) and self.ipv6_prefix < 128:
            return str(ipaddress.ip_network(f"{ip}/{self.ipv6_prefix}", strict=False))
        return str(ip)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The anonymous identity's address: :meth:`caller_ip`, grouped."""
        return self.group(self.caller_ip(peer, forwarded_for))


def client_address(
    peer: str | None,
    forwarded_for: str | None,
    trusted_proxies: int,
    *,
    trusted_networks: Sequence[IPNetwork] | str | None = None,
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
) -> str:
    """One-shot :meth:`AddressPolicy.client_address` (kept for the first release's callers)."""
    policy = AddressPolicy(trusted_proxies=trusted_proxies, trusted_networks=trusted_networks, ipv6_prefix=ipv6_prefix)
    return policy.client_address(peer, forwarded_for)
