"""Generator functions streamed through both tiers, as processes (``tests/apps/streams.py``).

Each chunk the app yields carries the time it was made on the GPU tier (this machine's
clock, as the tests'), so arrival is checked against the generator's own yield times:
every chunk, in order, once, the first arriving long before the last is made. A caller who
leaves stops the generator (its log says how far it got) and the GPU takes the next job
within half a second; a long stream is charged as it runs; a runaway one is stopped at its
time limit. Clients: gradio_client, the REST event stream, @gradio/client (Node).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client

from splitspace.shared.contract.headers import ADMIN_HEADER
from tests.support import OPEN_ANONYMOUS, TIER, Deployment, app_deployment, keys_toml, tiers_toml, wait_for

STREAMS = "tests/apps/streams.py"
NODE_DIR = Path(__file__).resolve().parent / "node"
NAMES = ("leaver", "next", "payer", "slow", "ordinary")
QUOTAS = tiers_toml(anonymous=OPEN_ANONYMOUS, light=TIER) + keys_toml(
    dict.fromkeys(NAMES, "light"), lambda n: f"stream-{n}-key"
)


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer stream-{name}-key"}


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = app_deployment(tmp_path_factory.mktemp("streams"), STREAMS, QUOTAS).start()
    yield d
    d.stop()


def made_at(chunk: str) -> tuple[int, float]:
    """A chunk's index and the time the generator made it."""
    index, at = chunk.split()
    return int(index), float(at)


def log_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def health(d: Deployment) -> dict[str, Any]:
    assert d.backend is not None
    return httpx.get(f"{d.backend.url}/health", timeout=10).json()


def used(d: Deployment, name: str) -> float:
    """GPU seconds the GPU tier has charged the key so far."""
    assert d.backend is not None
    doc = httpx.get(
        f"{d.backend.url}/admin/clients/key:{name}", headers={ADMIN_HEADER: d.admin_token}, timeout=10
    ).json()
    return float(doc["used"])


def metric(d: Deployment, name: str) -> float:
    assert d.backend is not None
    for line in httpx.get(f"{d.backend.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    return 0.0


def rest_events(
    d: Deployment, api: str, data: list[Any], who: str | None = None, leave: threading.Event | None = None
) -> list[tuple[float, str, Any]]:
    """A REST call's event stream through the frontend: (arrival time, event, data) for each
    event; with ``leave``, the caller goes away (closes the stream) at the first chunk after it is set."""
    assert d.frontend is not None
    headers = bearer(who) if who else {}
    events: list[tuple[float, str, Any]] = []
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{d.frontend.url}/gradio_api/call/{api}", json={"data": data}, headers=headers)
        r.raise_for_status()
        event_id, name = r.json()["event_id"], ""
        with c.stream("GET", f"{d.frontend.url}/gradio_api/call/{api}/{event_id}", headers=headers) as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((time.time(), name, json.loads(line[5:].strip())))
                    if name in ("complete", "error"):
                        break
                    if leave is not None and leave.is_set():
                        break
    return events


def assert_streamed(chunks: list[tuple[float, str]], n: int, every_s: float) -> None:
    """Every chunk, in order, once; each arrived after it was made and soon after; the first
    arrived long before the last was made (streamed, not delivered at the end)."""
    made = [made_at(chunk) for _, chunk in chunks]
    assert [i for i, _ in made] == list(range(n)), [i for i, _ in made]
    lags = [arrived - at for (arrived, _), (_, at) in zip(chunks, made, strict=True)]
    assert min(lags) >= 0, lags
    assert max(lags) < 1.0, lags  # each within a second of being made (a loaded 2-core machine)
    first_arrived, last_made = chunks[0][0], made[-1][1]
    assert first_arrived < last_made - (n - 1) * every_s / 2, (first_arrived, last_made)


# -- each chunk, as it is made, to every kind of client -------------------------------------
def test_gradio_client_gets_each_chunk_as_it_is_made(tiers: Deployment) -> None:
    assert tiers.frontend is not None
    client = Client(tiers.frontend.url, verbose=False)
    try:
        job = client.submit(20, 50, "", api_name="/ticks")
        chunks = [(time.time(), out) for out in job]
        assert job.result() == chunks[-1][1]
    finally:
        client.close()
    assert_streamed(chunks, 20, 0.05)


@pytest.mark.parametrize("api", ["ticks", "aticks"])
def test_the_rest_event_stream_carries_each_chunk_as_it_is_made(tiers: Deployment, api: str) -> None:
    events = rest_events(tiers, api, [20, 50, ""])
    assert events[-1][1] == "complete", events[-3:]
    chunks = [(at, data[0]) for at, name, data in events if name == "generating"]
    assert events[-1][2] == [chunks[-1][1]]  # the result is the last yield
    assert_streamed(chunks, 20, 0.05)


def test_a_chatbot_streams_its_answer_word_by_word(tiers: Deployment) -> None:
    assert tiers.frontend is not None
    client = Client(tiers.frontend.url, verbose=False)
    try:
        job = client.submit("a fox in the snow", [], api_name="/reply")
        answers = []
        for _, history in job:
            assert history[0]["role"] == "user"
            answers.append(history[-1]["content"][0]["text"] if history[-1]["role"] == "assistant" else "")
    finally:
        client.close()
    assert answers == ["A", "A FOX", "A FOX IN", "A FOX IN THE", "A FOX IN THE SNOW"], answers


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_node_client_gets_each_chunk_as_it_is_made(tiers: Deployment) -> None:
    if not (NODE_DIR / "node_modules" / "@gradio" / "client").is_dir():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install tests/node's dependencies (npm ci)"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300, capture_output=True
        )
    assert tiers.frontend is not None
    env = {k: v for k, v in os.environ.items() if k != "SPLITSPACE_API_KEY"}
    proc = subprocess.run(
        ["node", str(NODE_DIR / "stream.mjs"), tiers.frontend.url, "/ticks", json.dumps([20, 50, ""])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines[-1]["stage"] == "complete", lines[-3:]
    chunks = [(line["at"], line["data"][0]) for line in lines if line["stage"] == "data"]
    assert chunks[-1][1] == chunks[-2][1]  # the completion repeats the last output (Gradio's protocol)
    assert_streamed(chunks[:-1], 20, 0.05)


# -- a caller who leaves -----------------------------------------------------------------------
@pytest.mark.parametrize(("api", "every_ms"), [("ticks", 10), ("aticks", 2000)])
def test_a_caller_who_leaves_stops_the_stream_and_the_gpu_takes_the_next_job(
    tiers: Deployment, tmp_path: Path, api: str, every_ms: int
) -> None:
    """One caller's endless stream holds the GPU while another's waits (its place told);
    the first goes away mid-stream: its generator stops (its log ends with "closed") and
    the waiting one's first chunk is made within half a second. With ``aticks`` a chunk
    comes every 2 s: the stop does not wait for the next one."""
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    stopped = metric(tiers, 'splitspace_requests_total{outcome="stopped"}')
    left_at: list[float] = []
    go = threading.Event()

    def leave() -> None:
        rest_events(tiers, api, [100_000, every_ms, str(first)], "leaver", leave=go)
        left_at.append(time.time())

    leaver = threading.Thread(target=leave, daemon=True)
    leaver.start()
    assert wait_for(lambda: len(log_of(first)) >= 1, 60), log_of(first)
    assert tiers.frontend is not None
    client = Client(tiers.frontend.url, verbose=False, headers=bearer("next"))
    try:
        job = client.submit(1, 10, str(second), api_name="/ticks")
        assert wait_for(lambda: health(tiers)["queued"] == 1, 30), health(tiers)
        assert wait_for(lambda: "In line" in str(getattr(job.status(), "progress_data", "")), 30), job.status()
        assert not log_of(second)
        go.set()
        leaver.join(60)
        assert left_at and wait_for(lambda: log_of(second), 10), log_of(second)
        assert job.result(timeout=30).startswith("0 ")
        assert job.outputs() == [job.result()]  # its waiting told through progress, not as outputs
    finally:
        client.close()
    started_next = made_at(log_of(second)[0])[1]
    assert started_next - left_at[0] < 0.5, started_next - left_at[0]
    lines = log_of(first)
    assert lines[-1] == "closed" and len(lines) < 100_000, lines[-3:]
    assert made_at(lines[-2])[1] < started_next  # nothing of the first ran after the second began
    assert wait_for(lambda: metric(tiers, 'splitspace_requests_total{outcome="stopped"}') == stopped + 1, 10)
    assert used(tiers, "leaver") > 0  # charged the GPU time it used


# -- fair with long streams --------------------------------------------------------------------
def test_a_long_stream_is_charged_while_it_runs(tiers: Deployment, tmp_path: Path) -> None:
    """``aticks`` is estimated at 0.05 s; a 3 s stream's charge grows past that while it runs."""
    log = tmp_path / "long.log"
    before = used(tiers, "payer")
    done: list[Any] = []
    caller = threading.Thread(
        target=lambda: done.append(rest_events(tiers, "aticks", [100, 30, str(log)], "payer")), daemon=True
    )
    caller.start()
    assert wait_for(lambda: used(tiers, "payer") - before >= 1.0, 30), used(tiers, "payer") - before
    assert "closed" not in log_of(log) and not done  # still streaming
    caller.join(60)
    assert done and done[0][-1][1] == "complete"
    spent = used(tiers, "payer") - before
    assert 2.9 <= spent < 10, spent  # settled with the whole stream's time


def test_a_runaway_generator_is_stopped_at_its_time_limit(tiers: Deployment, tmp_path: Path) -> None:
    log = tmp_path / "runaway.log"
    events = rest_events(tiers, "runaway", [10, str(log)], "slow")
    assert events[-1][1] == "error", events[-3:]
    error = events[-1][2]
    assert error["title"] == "Time limit" and "time limit of 1 s" in error["error"], error
    chunks = [made_at(data[0]) for _, name, data in events if name == "generating"]
    assert len(chunks) >= 5 and chunks[-1][1] - chunks[0][1] < 1.5, chunks[-3:]
    assert log_of(log)[-1] == "closed"
    # the GPU is free for the next call
    assert rest_events(tiers, "ticks", [2, 10, ""], "slow")[-1][1] == "complete"
