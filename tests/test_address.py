"""Who an anonymous caller is: ``X-Forwarded-For`` only from a trusted proxy, IPv6 by /64.

First release: the header was believed from any peer (``TRUSTED_PROXIES=1`` and a
frontend reachable directly: a caller wrote its own address, 20 of 20 calls ran
against a ceiling of 6), and uvicorn believed it from loopback even with
``TRUSTED_PROXIES=0``; every IPv6 address was its own anonymous client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from splitspace.session.address import AddressPolicy, client_address, parse_networks
from tests.clients import call_rest
from tests.conftest import QUOTAS
from tests.support import Deployment

PROXY = "127.0.0.2"
"""A second loopback address (Linux answers the whole 127/8): the trusted proxy of ``behind_proxy``."""


def whoami(base: str, headers: dict[str, str] | None = None, local_address: str | None = None) -> str:
    transport = httpx.HTTPTransport(local_address=local_address) if local_address else None
    with httpx.Client(timeout=30, transport=transport) as c:
        final, events = call_rest(c, base, "quota", [], headers)
    assert final == "complete", events
    return events[-1][1][0]["client"]


@pytest.fixture(scope="module")
def behind_proxy(direct: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second frontend on ``direct``'s GPU tier that trusts one proxy, at 127.0.0.2 only."""
    d = Deployment(
        Path(tmp_path_factory.mktemp("proxy")),
        secret=direct.secret,
        backend_port=direct.backend_port,
        trusted_proxies=1,
        frontend_env={"SPLITSPACE_TRUSTED_PROXY_CIDRS": f"{PROXY}/32"},
    )
    d.write_quotas(QUOTAS)
    d.start_frontend()
    yield d.frontend.url  # type: ignore[union-attr]
    d.stop()


def test_no_trusted_proxy_means_the_header_is_never_believed(direct: Deployment) -> None:
    """With ``TRUSTED_PROXIES=0``, not even from loopback (uvicorn believed it there)."""
    base = direct.frontend.url  # type: ignore[union-attr]
    seen = {whoami(base, {"x-forwarded-for": f"198.51.100.{i}"}) for i in range(5)}
    assert seen == {"addr:127.0.0.1"}


def test_a_caller_that_is_not_the_proxy_cannot_choose_its_address(behind_proxy: str) -> None:
    seen = {whoami(behind_proxy, {"x-forwarded-for": f"198.51.100.{i}"}) for i in range(5)}
    assert seen == {"addr:127.0.0.1"}


def test_the_trusted_proxy_says_who_its_callers_are(behind_proxy: str) -> None:
    assert whoami(behind_proxy, {"x-forwarded-for": "203.0.113.7"}, PROXY) == "addr:203.0.113.7"
    assert whoami(behind_proxy, {"x-forwarded-for": "1.2.3.4, 203.0.113.8"}, PROXY) == "addr:203.0.113.8"
    assert whoami(behind_proxy, {"x-forwarded-for": "not-an-address"}, PROXY) == f"addr:{PROXY}"


def test_ipv6_callers_of_one_64_are_one_client(behind_proxy: str) -> None:
    """First release: every IPv6 address was its own anonymous client (one /64: unlimited quota)."""
    same = {whoami(behind_proxy, {"x-forwarded-for": f"2001:db8:1:2::{i:x}"}, PROXY) for i in range(1, 6)}
    assert same == {"addr:2001:db8:1:2::/64"}
    assert whoami(behind_proxy, {"x-forwarded-for": "2001:db8:1:3::1"}, PROXY) == "addr:2001:db8:1:3::/64"


# -- the rule itself --------------------------------------------------------------------------
def test_the_header_is_read_only_from_a_trusted_peer() -> None:
    policy = AddressPolicy(trusted_proxies=1, trusted_networks="10.0.0.0/8")
    assert policy.client_address("10.1.2.3", "203.0.113.9") == "203.0.113.9"
    assert policy.client_address("198.51.100.1", "203.0.113.9") == "198.51.100.1"


def test_a_count_alone_trusts_loopback_and_private_peers() -> None:
    policy = AddressPolicy(trusted_proxies=1)
    assert policy.client_address("10.0.0.5", "203.0.113.9") == "203.0.113.9"
    assert policy.client_address("127.0.0.1", "203.0.113.9") == "203.0.113.9"
    assert policy.client_address("203.0.113.50", "198.51.100.1") == "203.0.113.50"  # a public peer: itself


def test_no_count_and_no_networks_never_reads_the_header() -> None:
    assert AddressPolicy().client_address("127.0.0.1", "203.0.113.9") == "127.0.0.1"
    assert client_address("10.0.0.1", "203.0.113.9", 0) == "10.0.0.1"


def test_the_count_picks_the_entry_the_outermost_proxy_appended() -> None:
    policy = AddressPolicy(trusted_proxies=2, trusted_networks="10.0.0.0/8")
    # client -> CDN -> platform proxy (10.0.0.2) -> us; the client forged an entry first.
    assert policy.client_address("10.0.0.2", "6.6.6.6, 203.0.113.9, 198.51.100.20") == "203.0.113.9"
    assert policy.client_address("10.0.0.2", "203.0.113.9") == "203.0.113.9"  # a short chain: its first


def test_networks_without_a_count_walk_back_over_trusted_hops() -> None:
    policy = AddressPolicy(trusted_networks="10.0.0.0/8, 127.0.0.1")
    assert policy.client_address("127.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.3") == "203.0.113.9"
    assert policy.client_address("127.0.0.1", "10.0.0.4, 10.0.0.3") == "10.0.0.4"


def test_ipv6_is_grouped_by_its_prefix_and_ipv4_mapped_is_ipv4() -> None:
    policy = AddressPolicy()
    assert policy.client_address("2001:db8:a:b:1:2:3:4", None) == "2001:db8:a:b::/64"
    assert policy.client_address("::ffff:192.0.2.1", None) == "192.0.2.1"
    assert AddressPolicy(ipv6_prefix=48).client_address("2001:db8:a:b::1", None) == "2001:db8:a::/48"
    assert AddressPolicy(ipv6_prefix=128).client_address("2001:db8::1", None) == "2001:db8::1"
    assert policy.client_address(None, "1.2.3.4") == "unknown"


def test_bad_networks_are_named() -> None:
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks("10.0.0.0/8, not-a-net")
