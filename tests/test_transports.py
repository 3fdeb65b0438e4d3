"""All transports against the same GPU tier: same results, same errors, same identity, same status."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from io import BytesIO

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.clients import call_rest, error_text, gen_args
from tests.support import (
    GPU_TIER_BACKLOG,
    Deployment,
    TierProcess,
    free_port,
    in_threads,
    keys_toml,
    start_tier,
    wait_for,
)

TRANSPORTS = ["direct", "httpx", "gradio_client"]
KEYS = {f"{name}-{t}": t for name in ("rate", "who", "order", "cancel", "busy") for t in TRANSPORTS}

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
    {k: "rate" if k.startswith("rate") else "paused" if k.startswith("cancel") else "std" for k in KEYS},
    lambda k: "k-" + k,
)


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer k-{name}"}


@pytest.fixture(scope="module")
def tiers(tmp_path_factory) -> Iterator[dict[str, object]]:
    d = Deployment(
        tmp_path_factory.mktemp("transports"),
        model="sleep:300",
        quotas=QUOTAS,
        transport="direct",
        frontend_env=dict(GPU_TIER_BACKLOG),
    )
    d.start()
    others = {}
    for t in TRANSPORTS[1:]:
        env = {
            **d.common_env(),
            **GPU_TIER_BACKLOG,
            "SPLITSPACE_BACKEND_URL": d.backend_urls(),
            "SPLITSPACE_TRANSPORT": t,
        }
        others[t] = start_tier("frontend", free_port(), env, d.workdir / f"frontend-{t}.log")
    yield {"d": d, "direct": d.frontend, **others}
    for tier in others.values():
        tier.stop()
    d.stop()


def frontend(tiers, transport: str) -> TierProcess:
    return tiers[transport]  # type: ignore[return-value]


def _image(c: httpx.Client, events) -> np.ndarray:
    image, _ = events[-1][1]
    return np.asarray(Image.open(BytesIO(c.get(image["url"]).content)))


def test_same_results(tiers):
    outs = {}
    for t in TRANSPORTS:
        with httpx.Client(timeout=60) as c:
            final, events = call_rest(c, frontend(tiers, t).url, "generate", gen_args(seed=11, width=80))
            assert final == "complete", events
            outs[t] = (_image(c, events), events[-1][1][1])
    img_a, info_a = outs["direct"]
    for t in TRANSPORTS[1:]:
        img_b, info_b = outs[t]
        assert np.array_equal(img_a, img_b), t
        assert {k: info_a[k] for k in ("seed", "width", "height", "steps", "model")} == {
            k: info_b[k] for k in ("seed", "width", "height", "steps", "model")
        }, t


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_identity(tiers, transport):
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, frontend(tiers, transport).url, "generate", gen_args(), bearer(f"who-{transport}"))
    assert events[-1][1][1]["client"] == f"key:who-{transport}"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_throttling_error_from_the_gpu_tier(tiers, transport):
    """requests_per_minute = 1 is enforced by the GPU tier: its title and retry seconds cross the hop."""
    url = frontend(tiers, transport).url
    with httpx.Client(timeout=60) as c:
        assert call_rest(c, url, "generate", gen_args(), bearer(f"rate-{transport}"))[0] == "complete"
        final, events = call_rest(c, url, "generate", gen_args(), bearer(f"rate-{transport}"))
    text = error_text(events)
    assert final == "error" and text.startswith("Rate limited: "), text
    assert text.endswith(" s.") and "Retry in " in text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_validation_error(tiers, transport):
    """Refused naming the field. Over the direct hop the frontend serves the built-in app as any
    app: refused at the POST (422) naming the input by its label; the httpx and gradio_client
    transports carry no app's calls and keep the built-in's page: an error event."""
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, frontend(tiers, transport).url, "generate", gen_args(steps=99))
    said = "Steps: must be at most 50" if transport == "direct" else "Invalid request: steps: "
    assert final == "error" and error_text(events).startswith(said), events
    assert (events[0][0] == "refused") == (transport == "direct"), events


def _backlog(url: str, key: str, n: int) -> list[threading.Thread]:
    def one() -> None:
        with httpx.Client(timeout=120) as c:
            call_rest(c, url, "generate", gen_args(), bearer(key))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _admin(d: Deployment, method: str, client: str, **kwargs) -> dict:
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_status_updates_arrive_in_order(tiers, transport):
    d: Deployment = tiers["d"]  # type: ignore[assignment]
    url = frontend(tiers, transport).url
    key = f"order-{transport}"
    # held by an override (max_running 0) until the last request has been told it waits
    _admin(d, "PUT", f"key:{key}", json={"max_running": 0})
    threads: list[threading.Thread] = []
    try:
        threads += _backlog(url, f"busy-{transport}", 3)
        threads += _backlog(url, key, 3)  # its own backlog: the next one waits behind it
        assert wait_for(lambda: _admin(d, "GET", f"key:{key}")["queued"] == 3, 30, 0.05)
        events: list[tuple[str, object]] = []
        finals: list[str] = []
        last = threading.Thread(target=lambda: finals.append(_generate_live(url, bearer(key), events)))
        last.start()
        assert wait_for(lambda: _queued_statuses(events), 30, 0.05), events
    finally:
        _admin(d, "DELETE", f"key:{key}")
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


@pytest.mark.parametrize("transport", ["direct", "httpx"])
def test_cancellation_reaches_the_gpu_tier(tiers, transport):
    """A caller who leaves while its job waits: the job leaves the GPU tier's queue and never runs.

    Only the direct and httpx transports can cancel one call (gradio_client's cancel is per session and
    endpoint, so on a shared Client it would cancel every caller's job: it abandons instead)."""
    d: Deployment = tiers["d"]  # type: ignore[assignment]
    url = frontend(tiers, transport).url
    key = f"cancel-{transport}"  # its tier has max_running = 0: its jobs wait until cancelled
    cancelled = 'splitspace_requests_total{outcome="cancelled"}'
    before = _metric(d.backend.url, cancelled)
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/gradio_api/call/generate", json={"data": gen_args()}, headers=bearer(key))
        event_id = r.json()["event_id"]
        with c.stream("GET", f"{url}/gradio_api/call/generate/{event_id}") as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    assert '"queued"' in line, line
                    break  # the caller goes away while its job waits
    wait_for(lambda: _metric(d.backend.url, cancelled) > before, 10, 0.1)
    assert _metric(d.backend.url, cancelled) == before + 1
    admin = httpx.get(f"{d.backend.url}/admin/clients/key:{key}", headers={"x-splitspace-admin": d.admin_token}).json()
    assert admin["running"] == 0 and admin["queued"] == 0 and admin["used"] == 0, admin


def test_same_error_when_the_backend_is_down(tmp_path):
    """A frontend of each transport on one GPU tier, which stops: each caller, right after, gets
    the same clear error within the bound (the frontends are called at once, as the tier goes)."""
    d = Deployment(tmp_path, model="sleep:10", transport=TRANSPORTS[0]).start()
    fronts = {TRANSPORTS[0]: d.frontend}
    try:
        for t in TRANSPORTS[1:]:
            env = {**d.common_env(), "SPLITSPACE_BACKEND_URL": d.backend_urls(), "SPLITSPACE_TRANSPORT": t}
            fronts[t] = start_tier("frontend", free_port(), env, tmp_path / f"frontend-{t}.log")
        d.backend.stop()

        def call(i: int) -> tuple[str, list, float]:
            with httpx.Client(timeout=60) as c:
                t0 = time.monotonic()
                final, events = call_rest(c, fronts[TRANSPORTS[i]].url, "generate", gen_args())
            return final, events, time.monotonic() - t0

        for transport, (final, events, took) in zip(TRANSPORTS, in_threads(len(TRANSPORTS), call), strict=True):
            assert final == "error" and error_text(events).startswith("GPU backend unavailable:"), (transport, events)
            assert took < 15, (transport, took)
    finally:
        for t in TRANSPORTS[1:]:
            if t in fronts:
                fronts[t].stop()
        d.stop()
