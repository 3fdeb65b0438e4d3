"""Fair scheduling seen from outside: real tiers (``sleep:100``), real clients, both tiers.

Each test drives the deployment as outside clients would (REST flow, gradio_client),
and checks orderings and shares with generous margins; speed is the benchmarks' job.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from gradio_client import Client

from splitspace.shared.contract.headers import ADMIN_HEADER
from tests.clients import call_rest, error_text, gen_args
from tests.support import GPU_TIER_BACKLOG, OPEN_ANONYMOUS, TIER, Deployment, keys_toml, tiers_toml, wait_for

KEYS = {
    "heavy": "burst",
    "light1": "light",
    "light2": "light",
    "light3": "light",
    "w1": "w1",
    "w3": "w3",
    "hog": "hog",
    "waiter": "light",
    "canceller": "paused",
}

QUOTAS = tiers_toml(
    anonymous={**OPEN_ANONYMOUS, "max_queued": 16},
    burst={**TIER, "max_queued": 30},
    light=TIER,
    w1=TIER,
    w3={**TIER, "weight": 3},
    hog={**TIER, "weight": 8, "max_queued": 40},
    paused={**TIER, "max_running": 0, "max_queued": 3},  # an operator's pause: admitted, never dispatched
) + keys_toml(KEYS, lambda name: f"fair-{name}-key")


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer fair-{name}-key"}


@pytest.fixture(scope="module")
def fair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(
        tmp_path_factory.mktemp("fair"), model="sleep:100", quotas=QUOTAS, frontend_env=dict(GPU_TIER_BACKLOG)
    )
    d.start()
    yield d
    d.stop()


# -- helpers ------------------------------------------------------------------------------
def generate(
    url: str, headers: dict[str, str], client: httpx.Client | None = None
) -> tuple[str, list[tuple[str, Any]]]:
    if client is not None:
        return call_rest(client, url, "generate", gen_args(), headers)
    with httpx.Client(timeout=120) as c:
        return call_rest(c, url, "generate", gen_args(), headers)


def info_of(events: list[tuple[str, Any]]) -> dict[str, Any]:
    return events[-1][1][1]


def statuses(events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The status updates (queued/running) among the ``generating`` events, in order."""
    out = []
    for name, payload in events:
        if name == "generating" and isinstance(payload, list) and len(payload) == 2:
            update = payload[1]
            if isinstance(update, dict) and "status" in update:
                out.append(update)
    return out


def admin_show(d: Deployment, client_id: str) -> dict[str, Any]:
    r = httpx.get(f"{d.backend.url}/admin/clients/{client_id}", headers={ADMIN_HEADER: d.admin_token}, timeout=10)
    r.raise_for_status()
    return r.json()


def metric(d: Deployment, name: str, labels: str = "") -> float:
    """One sample of the GPU tier's /metrics; 0.0 when absent."""
    text = httpx.get(f"{d.backend.url}/metrics", timeout=10).text
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def backlog_of(d: Deployment, client_id: str) -> int:
    s = admin_show(d, client_id)
    return s["queued"] + s["running"]


# -- tests --------------------------------------------------------------------------------
def test_noisy_neighbour_does_not_delay_light_clients(fair):
    """A burst of 30 from one key; 0.2 s later three light clients (gradio_client) ask once each.

    First-in-first-out would finish the lights after the whole burst; fair queueing
    serves each light at its next turn, so every light finishes ahead of most of the burst
    (the margin leaves room for a loaded machine: a light only has to beat a third of it)."""
    url = fair.frontend.url
    lights = {f"light{i}": Client(url, verbose=False, headers=bearer(f"light{i}")) for i in (1, 2, 3)}
    heavy_clients = [httpx.Client(timeout=120) for _ in range(30)]
    done: dict[str, list[float]] = {"heavy": [], "light": []}
    lock = threading.Lock()
    start = threading.Barrier(len(heavy_clients) + 1)

    def heavy(c: httpx.Client) -> None:
        start.wait()
        final, events = generate(url, bearer("heavy"), c)
        assert final == "complete", events
        with lock:
            done["heavy"].append(time.monotonic())

    def light(name: str) -> dict[str, Any]:
        _, info = lights[name].predict(*gen_args(), api_name="/generate")
        with lock:
            done["light"].append(time.monotonic())
        return info

    try:
        with ThreadPoolExecutor(len(heavy_clients)) as burst, ThreadPoolExecutor(3) as others:
            heavy_futures = [burst.submit(heavy, c) for c in heavy_clients]
            start.wait()
            time.sleep(0.2)
            light_futures = [others.submit(light, name) for name in lights]
            infos = [f.result(timeout=120) for f in light_futures]
            for f in heavy_futures:
                f.result(timeout=120)
    finally:
        for c in heavy_clients:
            c.close()
        for client in lights.values():
            client.close()

    assert {info["client"] for info in infos} == {"key:light1", "key:light2", "key:light3"}
    assert len(done["heavy"]) == 30
    for t in done["light"]:
        heavy_after = sum(h > t for h in done["heavy"])
        assert heavy_after >= 10, (sorted(done["heavy"]), sorted(done["light"]))


def test_weights_one_to_three_share_the_gpu_one_to_three(fair):
    """Two keys, weights 1 and 3, each keeping 4 requests in flight for about 6 s."""
    url = fair.frontend.url
    gpu: dict[str, float] = {"w1": 0.0, "w3": 0.0}
    served: dict[str, int] = {"w1": 0, "w3": 0}
    lock = threading.Lock()
    begin = time.monotonic() + 0.5
    counted_from, end = begin + 1.0, begin + 7.0

    def closed_loop(name: str) -> None:
        with httpx.Client(timeout=120) as c:
            time.sleep(max(0.0, begin - time.monotonic()))
            while time.monotonic() < end:
                final, events = generate(url, bearer(name), c)
                assert final == "complete", events
                finished = time.monotonic()
                if counted_from <= finished <= end:  # only while both were backlogged
                    with lock:
                        gpu[name] += info_of(events)["gpu_s"]
                        served[name] += 1

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(closed_loop, name) for name in ("w1", "w3") for _ in range(4)]
        for f in futures:
            f.result(timeout=120)

    assert served["w1"] >= 5 and served["w3"] >= 15, served
    ratio = gpu["w3"] / gpu["w1"]
    assert 2.2 <= ratio <= 3.8, (ratio, gpu, served)


@pytest.mark.serial  # a share measured over 5 s with 55 threads: other workers skewed it (ratio 2.1)
def test_fifty_fresh_cookies_from_one_address_get_one_share(fair):
    """50 anonymous callers from 10.0.0.1, each with its own fresh cookie, against one browser
    session from 10.0.0.2: minting cookies mints no share, the two addresses split the GPU."""
    url = fair.frontend.url
    gpu = {"10.0.0.1": 0.0, "10.0.0.2": 0.0}
    counts = {"served": 0, "queue_full": 0}
    other_errors: list[str] = []
    lock = threading.Lock()

    def browser(address: str) -> httpx.Client:
        c = httpx.Client(timeout=120, headers={"x-forwarded-for": address})
        c.get(url + "/").raise_for_status()  # the page load mints this browser's own cookie
        assert c.cookies.get("splitspace_session"), "no session cookie"
        return c

    crowd = [browser("10.0.0.1") for _ in range(50)]
    session = browser("10.0.0.2")
    begin = time.monotonic() + 0.5
    counted_from, end = begin + 1.5, begin + 6.5  # after the crowd's first rush is in

    def caller(c: httpx.Client, address: str, backoff_s: float) -> None:
        time.sleep(max(0.0, begin - time.monotonic()))
        while time.monotonic() < end:
            final, events = call_rest(c, url, "generate", gen_args())
            finished = time.monotonic()
            with lock:
                if final == "complete":
                    assert info_of(events)["client"].startswith("session:")
                    if counted_from <= finished <= end:
                        gpu[address] += info_of(events)["gpu_s"]
                        counts["served"] += 1
                elif error_text(events).startswith("Queue full"):
                    counts["queue_full"] += 1
                else:
                    other_errors.append(error_text(events))
            if final != "complete":
                time.sleep(backoff_s)

    try:
        with ThreadPoolExecutor(55) as pool:
            futures = [pool.submit(caller, c, "10.0.0.1", 2.0 + (i % 10) / 10) for i, c in enumerate(crowd)]
            # One browser session keeping a closed loop, from a few tabs so that it never goes idle
            # while its next request crosses the (busy) frontend.
            futures += [pool.submit(caller, session, "10.0.0.2", 0.2) for _ in range(5)]
            for f in futures:
                f.result(timeout=180)
    finally:
        for c in crowd + [session]:
            c.close()

    assert not other_errors, other_errors[:3]
    assert gpu["10.0.0.1"] > 0 and gpu["10.0.0.2"] > 0, (gpu, counts)
    ratio = gpu["10.0.0.1"] / gpu["10.0.0.2"]
    assert 0.6 <= ratio <= 1.67, (ratio, gpu, counts)


def test_waiting_caller_sees_position_and_eta_that_never_go_back(fair):
    """Behind a weight-8 backlog, a weight-1 key's requests wait; each REST caller gets status
    updates (queued, position, ETA) before its result, and its position only moves forward."""
    url = fair.frontend.url
    admitted = metric(fair, "splitspace_requests_total", 'outcome="admitted"')
    clients = [httpx.Client(timeout=120) for _ in range(40)]
    try:
        with ThreadPoolExecutor(40) as pool:
            hog = [pool.submit(generate, url, bearer("hog"), c) for c in clients[:36]]
            # the whole backlog is in before the waiter asks (a later hog job could go ahead of it)
            assert wait_for(
                lambda: metric(fair, "splitspace_requests_total", 'outcome="admitted"') - admitted >= 36, 30
            )
            assert backlog_of(fair, "key:hog") >= 20, admin_show(fair, "key:hog")
            waiters = [pool.submit(generate, url, bearer("waiter"), c) for c in clients[36:]]
            results = [f.result(timeout=120) for f in waiters]
            for f in hog:
                assert f.result(timeout=120)[0] == "complete"
    finally:
        for c in clients:
            c.close()

    longest = 0
    for final, events in results:
        assert final == "complete", events
        updates = statuses(events)
        queued = [u for u in updates if u["status"] == "queued"]
        for u in queued:
            assert isinstance(u["position"], int) and u["position"] >= 1, u
            assert isinstance(u["eta_s"], (int, float)) and u["eta_s"] >= 0, u
        positions = [u["position"] for u in updates]  # "running" reports position 0
        assert positions == sorted(positions, reverse=True), updates
        longest = max(longest, len(queued))
    assert longest >= 2, [statuses(ev) for _, ev in results]


def test_caller_who_goes_away_is_dropped_and_never_charged(fair):
    """A client fills its queue; its callers close their event streams after the first status.
    The GPU tier drops each job: counted as cancelled, never run, and the GPU time reserved
    at admission is given back (used stays 0).

    The client is paused by its operator (max_running 0): fair queueing serves a newcomer's
    first job at the next turn, so only a paused client's job is sure to be still waiting
    when the cancel arrives (noticed at each tier's next status yield, about 1 s apart)."""
    url = fair.frontend.url
    cancelled_before = metric(fair, "splitspace_requests_total", 'outcome="cancelled"')
    assert admin_show(fair, "key:canceller")["used"] == 0

    def go_away_after_first_status() -> dict[str, Any]:
        with httpx.Client(timeout=60) as c:
            r = c.post(f"{url}/gradio_api/call/generate", json={"data": gen_args()}, headers=bearer("canceller"))
            r.raise_for_status()
            event_id = r.json()["event_id"]
            name = ""
            with c.stream("GET", f"{url}/gradio_api/call/generate/{event_id}") as s:
                for line in s.iter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        assert name == "generating", line
                        return json.loads(line[5:])[1]
        raise AssertionError("the stream ended without an event")

    with ThreadPoolExecutor(3) as pool:
        first = [f.result(timeout=60) for f in [pool.submit(go_away_after_first_status) for _ in range(3)]]
    assert all(u["status"] == "queued" for u in first), first

    standing = admin_show(fair, "key:canceller")
    assert standing["queued"] + standing["running"] <= 3
    # Noticed at the GPU tier's next status yield (about a second per tier).
    assert wait_for(lambda: admin_show(fair, "key:canceller")["queued"] == 0, 15), admin_show(fair, "key:canceller")
    assert wait_for(lambda: metric(fair, "splitspace_requests_total", 'outcome="cancelled"') - cancelled_before >= 3, 5)
    standing = admin_show(fair, "key:canceller")
    assert standing["running"] == 0
    assert standing["used"] == pytest.approx(0.0, abs=1e-9), standing
    # never ran: it never started (no wait observed) and no GPU time was counted for its tier
    assert metric(fair, "splitspace_wait_seconds_count", 'tier="paused"') == 0
    assert metric(fair, "splitspace_gpu_seconds_total", 'tier="paused"') == 0
