"""Where a webhook may go: public addresses only, checked on the address actually connected to.

Why it exists: a webhook URL is a request the frontend makes on a caller's behalf, from
inside the deployment's network. Without a check, ``http://169.254.169.254/...`` (a
cloud's metadata service), ``http://127.0.0.1:7861/admin/...`` (the GPU tier) or any
private address would be reachable by whoever can submit a job (server-side request
forgery). So:

- at ``POST /v1/jobs`` the URL's host is resolved and every address it resolves to must
  be public (:func:`check_url`; a 400 names ``webhook_url`` otherwise);
- at each delivery the host is resolved again *by the connection itself*
  (:class:`SafeResolver`, aiohttp's resolver hook), and the connection goes to the
  addresses that passed: a name that resolved to a public address at the check and to
  a private one at the send (DNS rebinding) is refused there;
- loopback, private (RFC 1918, ULA ``fc00::/7``), link-local (``169.254/16``,
  ``fe80::/10``), shared (``100.64/10``), multicast, reserved and unspecified addresses are
  refused, and so are the metadata addresses by name (``169.254.169.254``,
  ``fd00:ec2::254``, ``100.100.100.200``), also inside an IPv6 address that embeds an
  IPv4 one (mapped, 6to4, Teredo, NAT64), unless ``SPLITSPACE_WEBHOOK_ALLOW`` (CIDR list)
  names the network (a receiver on the operator's own network, the tests' on loopback).

Redirects are not followed (``webhooks.py``), so a public receiver cannot bounce a
delivery inward.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]

METADATA: frozenset[IP] = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
"""Cloud metadata and credential services (AWS, GCP, Azure; AWS IPv6; Alibaba; ECS task credentials)."""
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
MAX_URL_CHARS = 2048
RESOLVE_TIMEOUT_S = 2.0


class TargetRefused(OSError):
    """A webhook target whose address is not public (nor allowed); the message says why."""


def _embedded(ip: IP) -> list[IP]:
    """``ip`` and any IPv4 address an IPv6 one carries."""
    out: list[IP] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
        if ip.teredo is not None:
            out.extend(ip.teredo)
        if ip in _NAT64:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def address_problem(ip: IP, allow: Networks = ()) -> str | None:
    """Why a webhook may not go to ``ip`` (None: it may)."""
    if any(ip.version == net.version and ip in net for net in allow):
        return None
    for a in _embedded(ip):
        if a in METADATA:
            return f"{ip} is a cloud metadata address"
        for bad, word in (
            (a.is_loopback, "loopback"),
            (a.is_link_local, "link-local"),
            (a.is_multicast, "multicast"),
            (a.is_unspecified, "unspecified"),
            (a.is_private, "private"),
            (a.is_reserved, "reserved"),
        ):
            if bad:
                return f"{ip} is a {word} address"
        if not a.is_global:
            return f"{ip} is not a public address"
    return None


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a webhook URL; ValueError saying what is wrong."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"must be at most {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    host = parts.hostname
    if not host:
        raise ValueError("must name a host")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def literal_ip(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def resolve(host: str, port: int, family: int = socket.AF_UNSPEC) -> list[tuple[int, str, int]]:
    """(family, address, port) of each address ``host`` resolves to; TargetRefused when it does not."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family), RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        raise TargetRefused(f"{host} does not resolve ({type(exc).__name__})") from None
    return [(fam, str(addr[0]).split("%", 1)[0], int(addr[1])) for fam, _, _, _, addr in infos]


async def check_url(url: str, allow: Networks = ()) -> None:
    """Raise ValueError (with the reason) unless ``url`` may receive webhooks now."""
    _, host, port = split_url(url)
    ip = literal_ip(host)
    try:
        addresses = [ip] if ip is not None else [ipaddress.ip_address(a) for _, a, _ in await resolve(host, port)]
    except TargetRefused as exc:
        raise ValueError(str(exc)) from None
    for address in addresses:
        problem = address_problem(address, allow)
        if problem:
            raise ValueError(f"refused: {problem} (webhooks go to public addresses only)")


class SafeResolver(AbstractResolver):
    """aiohttp's resolver hook: resolve, refuse unless every address may be reached, and
    hand aiohttp exactly those addresses to connect to (no second lookup)."""

    def __init__(self, allow: Networks = ()) -> None:
        self.allow = list(allow)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        out: list[ResolveResult] = []
        for fam, address, p in await resolve(host, port, family):
            problem = address_problem(ipaddress.ip_address(address), self.allow)
            if problem:
                raise TargetRefused(f"refused: {problem}")
            out.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=p,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not out:
            raise TargetRefused(f"{host} does not resolve")
        return out

    async def close(self) -> None:
        return None
