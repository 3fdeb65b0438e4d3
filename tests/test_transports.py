"""The frontend's two transports held to one contract, and the hop end to end.

``Transport.call`` of both: the direct transport to a real GPU tier serving
``tests/apps/studio.py``, and ``MockTransport`` running the same app's functions in this
process (the stand-in for tests and for trying the frontend without a GPU tier). Each
answers a call with its statuses, then its outputs; a generator's yields as partials; a
function's ``gr.Error`` with its title and message, a crash with its exception type only,
and an unknown function by its name: the same, whichever transport.

Then the built-in app's ``/generate`` through a frontend and a GPU tier, as processes:
the caller's identity, the GPU tier's throttling, validation, statuses in order, a
caller who leaves and a GPU tier that stops reach the caller as they should.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from splitspace.cpu_frontend.hop.direct_transport import DirectTransport
from splitspace.cpu_frontend.hop.mock_transport import MockTransport
from splitspace.cpu_frontend.hop.transport import Transport
from splitspace.session.identity import Identity
from splitspace.session.token import IdentityTokens, call_purpose
from splitspace.shared.app.loader import gpu_endpoints, load_app
from splitspace.shared.contract.calls import Call, CallResult, Partial
from splitspace.shared.contract.errors import GpuFailed, SplitspaceError, UnknownEndpoint
from splitspace.shared.contract.headers import IDENTITY_HEADER
from splitspace.shared.contract.hop import CallUpdate, Status
from tests.clients import call_rest, error_text, gen_args
from tests.support import GPU_TIER_BACKLOG, Deployment, keys_toml, wait_for

REPO = Path(__file__).resolve().parent.parent
STUDIO = str(REPO / "tests/apps/studio.py")
CALLER = Identity("key:contract", "key", "free", "127.0.0.1")


# -- Transport.call: the direct transport and the mock, one contract ----------------------------
@pytest.fixture(scope="module")
def studio_gpu_tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A GPU tier alone, serving the studio app."""
    d = Deployment(tmp_path_factory.mktemp("studio-gpu"), backend_env={"SPLITSPACE_APP": STUDIO})
    d.start_backend()
    yield d
    d.stop()


@dataclass
class Hop:
    """A transport, and the secret its GPU tier checks tokens with (the mock checks none)."""

    transport: Transport
    secret: str = "unchecked"

    def follow(self, call: Call) -> list[CallUpdate]:
        """Every update of one call, sent as the frontend sends it: with a token bound to the call."""

        async def run() -> list[CallUpdate]:
            token = IdentityTokens([self.secret]).mint(CALLER, call_purpose(call.digest()))
            try:
                return [update async for update in self.transport.call(call, {IDENTITY_HEADER: token})]
            finally:
                await self.transport.aclose()

        return asyncio.run(run())


@pytest.fixture(params=["direct", "mock"])
def hop(request: pytest.FixtureRequest) -> Hop:
    if request.param == "direct":
        d: Deployment = request.getfixturevalue("studio_gpu_tier")
        assert d.backend is not None
        return Hop(DirectTransport(d.backend.url, timeout_s=10), d.secret)
    sys.modules.pop("studio", None)  # as written, not as a frontend built in this process rewired it
    return Hop(MockTransport(functions=gpu_endpoints(load_app(STUDIO))))


def test_a_call_answers_its_statuses_then_its_outputs(hop: Hop) -> None:
    *before, last = updates = hop.follow(Call("stats", ["hello"]))
    assert all(isinstance(u, Status) for u in before), updates
    assert isinstance(last, CallResult), updates
    assert last.data == ["HELLO", 5]
    assert last.info.endpoint == "stats" and last.info.gpu_s >= 0


def test_a_generators_last_yield_is_the_result_and_its_others_come_in_order(hop: Hop) -> None:
    """Yields the caller has not been sent yet when the next comes may be skipped (the last
    replaces them), never reordered; the last is always the result."""
    updates = hop.follow(Call("countdown", [2]))
    partials = [u.data for u in updates if isinstance(u, Partial)]
    yields = [["2"], ["1"], ["0"]]
    assert partials == [y for y in yields if y in partials], updates
    assert isinstance(updates[-1], CallResult) and updates[-1].data == ["0"], updates


def test_a_functions_gr_error_arrives_with_its_title_and_message(hop: Hop) -> None:
    with pytest.raises(SplitspaceError) as raised:
        hop.follow(Call("fussy", ["bad"]))
    assert (raised.value.title, raised.value.message) == ("Fussy", "no bad words here")


def test_a_functions_crash_arrives_as_its_exception_type_only(hop: Hop) -> None:
    with pytest.raises(GpuFailed) as raised:
        hop.follow(Call("fussy", ["boom"]))
    assert raised.value.message == "the function failed (ValueError)"  # not the path it named


def test_an_unknown_function_is_refused_by_its_name(hop: Hop) -> None:
    with pytest.raises(UnknownEndpoint) as raised:  # `count` has no decorator: the frontend's own
        hop.follow(Call("count", ["a b"]))
    assert "'count'" in raised.value.message


# -- the built-in's /generate through both tiers --------------------------------------------------
NAMES = ("rate", "who", "order", "cancel", "busy")
QUOTAS = """
[tiers.std]
weight = 1
max_running = 1
max_queued = 20
gpu_seconds = 1000
window_s = 3600

[tiers.paused]
weight = 1
max_running = 0
max_queued = 20
gpu_seconds = 1000
window_s = 3600

[tiers.rate]
weight = 1
max_running = 1
max_queued = 20
gpu_seconds = 1000
window_s = 3600
requests_per_minute = 1
""" + keys_toml(
    {n: "rate" if n == "rate" else "paused" if n == "cancel" else "std" for n in NAMES},
    lambda name: "k-" + name,
)


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer k-{name}"}


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(
        tmp_path_factory.mktemp("transports"), model="sleep:300", quotas=QUOTAS, frontend_env=dict(GPU_TIER_BACKLOG)
    )
    d.start()
    yield d
    d.stop()


def url_of(d: Deployment) -> str:
    assert d.frontend is not None
    return d.frontend.url


def test_the_gpu_tier_sees_the_callers_identity(tiers: Deployment) -> None:
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, url_of(tiers), "generate", gen_args(), bearer("who"))
    assert final == "complete", events
    assert events[-1][1][1]["client"] == "key:who"


def test_the_gpu_tiers_throttling_crosses_the_hop(tiers: Deployment) -> None:
    """requests_per_minute = 1 is enforced by the GPU tier: its title and retry seconds cross the hop."""
    url = url_of(tiers)
    with httpx.Client(timeout=60) as c:
        assert call_rest(c, url, "generate", gen_args(), bearer("rate"))[0] == "complete"
        final, events = call_rest(c, url, "generate", gen_args(), bearer("rate"))
    text = error_text(events)
    assert final == "error" and text.startswith("Rate limited: "), text
    assert text.endswith(" s.") and "Retry in " in text


def test_an_invalid_request_is_refused_at_the_post_naming_its_input(tiers: Deployment) -> None:
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, url_of(tiers), "generate", gen_args(steps=99))
    assert final == "error" and error_text(events).startswith("Steps: must be at most 50"), events
    assert events[0][0] == "refused", events


def _backlog(url: str, key: str, n: int) -> list[threading.Thread]:
    def one() -> None:
        with httpx.Client(timeout=120) as c:
            call_rest(c, url, "generate", gen_args(), bearer(key))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _admin(d: Deployment, method: str, client: str, **kwargs: Any) -> dict:
    assert d.backend is not None
    r = httpx.request(
        method,
        f"{d.backend.url}/admin/clients/{client}",
        headers={"x-splitspace-admin": d.admin_token},
        timeout=10,
        **kwargs,
    )
    r.raise_for_status()
    return r.json()


def _generate_live(url: str, headers: dict[str, str], events: list[tuple[str, object]]) -> str:
    """``call_rest``, with each event appended to ``events`` as it arrives; the final event's name."""
    with httpx.Client(timeout=120) as c:
        r = c.post(f"{url}/gradio_api/call/generate", json={"data": gen_args()}, headers=headers)
        r.raise_for_status()
        name = ""
        with c.stream("GET", f"{url}/gradio_api/call/generate/{r.json()['event_id']}", headers=headers) as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    raw = line[5:].strip()
                    try:
                        events.append((name, json.loads(raw)))
                    except ValueError:
                        events.append((name, raw))
                    if name in ("complete", "error"):
                        return name
    return name


def _queued_statuses(events: list[tuple[str, object]]) -> list[dict]:
    statuses = [data[1] for name, data in list(events) if name == "generating" and data[1]]  # type: ignore[index]
    return [s for s in statuses if s.get("status") == "queued"]


def test_status_updates_arrive_in_order(tiers: Deployment) -> None:
    url, key = url_of(tiers), "order"
    # held by an override (max_running 0) until the last request has been told it waits
    _admin(tiers, "PUT", f"key:{key}", json={"max_running": 0})
    threads: list[threading.Thread] = []
    try:
        threads += _backlog(url, "busy", 3)
        threads += _backlog(url, key, 3)  # its own backlog: the next one waits behind it
        assert wait_for(lambda: _admin(tiers, "GET", f"key:{key}")["queued"] == 3, 30, 0.05)
        events: list[tuple[str, object]] = []
        finals: list[str] = []
        last = threading.Thread(target=lambda: finals.append(_generate_live(url, bearer(key), events)))
        last.start()
        assert wait_for(lambda: _queued_statuses(events), 30, 0.05), events
    finally:
        _admin(tiers, "DELETE", f"key:{key}")
        # limits are read at the next dispatch: one more request (behind the last one) makes it
        threads += _backlog(url, key, 1)
    last.join(timeout=120)
    for t in threads:
        t.join()
    assert finals == ["complete"], events
    queued = _queued_statuses(events)
    assert queued, events
    positions = [s["position"] for s in queued]
    assert positions == sorted(positions, reverse=True), positions
    assert all(s["eta_s"] >= 0 and "position" in s["message"] for s in queued)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    return 0.0


def test_cancellation_reaches_the_gpu_tier(tiers: Deployment) -> None:
    """A caller who leaves while its job waits: the job leaves the GPU tier's queue and never runs."""
    assert tiers.backend is not None
    url, key = url_of(tiers), "cancel"  # its tier has max_running = 0: its jobs wait until cancelled
    cancelled = 'splitspace_requests_total{outcome="cancelled"}'
    before = _metric(tiers.backend.url, cancelled)
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/gradio_api/call/generate", json={"data": gen_args()}, headers=bearer(key))
        event_id = r.json()["event_id"]
        with c.stream("GET", f"{url}/gradio_api/call/generate/{event_id}") as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    assert '"queued"' in line, line
                    break  # the caller goes away while its job waits
    wait_for(lambda: _metric(tiers.backend.url, cancelled) > before, 10, 0.1)
    assert _metric(tiers.backend.url, cancelled) == before + 1
    admin = _admin(tiers, "GET", f"key:{key}")
    assert admin["running"] == 0 and admin["queued"] == 0 and admin["used"] == 0, admin


def test_a_clear_error_within_the_bound_when_the_gpu_tier_stops(tmp_path: Path) -> None:
    d = Deployment(tmp_path, model="sleep:10").start()
    try:
        assert d.backend is not None
        d.backend.stop()
        with httpx.Client(timeout=60) as c:
            t0 = time.monotonic()
            final, events = call_rest(c, url_of(d), "generate", gen_args())
            took = time.monotonic() - t0
        assert final == "error" and error_text(events).startswith("GPU backend unavailable:"), events
        assert took < 15, took
    finally:
        d.stop()
