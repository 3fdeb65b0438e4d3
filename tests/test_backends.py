"""Several GPU tiers behind one frontend: spread, failover, no silent drops, rejoin."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.clients import call_rest, error_text, gen_args
from tests.support import Deployment, TierProcess, free_port, gpu_depth, start_tier, wait_for


def _finished(url: str) -> float:
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return -1
    for line in text.splitlines():
        if line.startswith('splitspace_requests_total{outcome="finished"}'):
            return float(line.split()[-1])
    return 0.0


def _in_flight(url: str) -> int:
    queued, running = gpu_depth(url)
    return queued + running


def _burst(url: str, n: int, prefix: str) -> list[tuple[str, list]]:
    results: list[tuple[str, list]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with httpx.Client(timeout=120) as c:  # each its own address: no per-client cap in the way
            r = call_rest(c, url, "generate", gen_args(seed=i), {"x-forwarded-for": f"{prefix}.{i}"})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@dataclass
class Two:
    """Two GPU tiers behind one frontend; ``second`` is whichever process serves the second port."""

    d: Deployment
    second: TierProcess
    second_port: int

    def start_second(self, log_name: str) -> TierProcess:
        env = {
            **self.d.common_env(),
            "SPLITSPACE_MODEL": self.d.model,
            "SPLITSPACE_STATE_PATH": str(self.d.workdir / "b2.sqlite3"),
        }
        self.second = start_tier("backend", self.second_port, env, self.d.workdir / log_name)
        return self.second


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Two]:
    """Shared by the tests below: each leaves both GPU tiers up (the kill test revives its victim)."""
    d = Deployment(tmp_path_factory.mktemp("two"), model="sleep:200")
    second_port = free_port()
    d.backend_urls = lambda: f"http://127.0.0.1:{d.backend_port},http://127.0.0.1:{second_port}"  # type: ignore[method-assign]
    d.workdir.mkdir(parents=True, exist_ok=True)
    d.start_backend()
    pair = Two(d, None, second_port)  # type: ignore[arg-type]
    try:
        pair.start_second("backend2.log")
        d.start_frontend()
        yield pair
    finally:
        if pair.second is not None:
            pair.second.stop()
        d.stop()


def test_requests_spread_over_both(two: Two) -> None:
    d, second = two.d, two.second
    results = _burst(d.frontend.url, 8, "10.2.0")
    assert all(final == "complete" for final, _ in results)
    assert _finished(d.backend.url) > 0 and _finished(second.url) > 0


def test_one_killed_mid_load_nothing_dropped_survivor_takes_over_and_it_rejoins(two: Two) -> None:
    d, second = two.d, two.second
    outcome: list[tuple[str, list]] = []
    runner = threading.Thread(target=lambda: outcome.extend(_burst(d.frontend.url, 16, "10.3.0")))
    runner.start()
    # mid load: the second GPU tier has a request running and another waiting
    assert wait_for(lambda: _in_flight(second.url) >= 2, 60, 0.05), gpu_depth(second.url)
    second.proc.send_signal(signal.SIGKILL)
    runner.join(timeout=120)
    assert not runner.is_alive(), "a request hung"
    assert len(outcome) == 16
    for final, events in outcome:  # every request ends in a result or the clear error
        assert final == "complete" or error_text(events).startswith("GPU backend unavailable:"), events
    assert sum(final == "complete" for final, _ in outcome) >= 8

    after = _burst(d.frontend.url, 6, "10.4.0")  # the survivor takes the load
    assert all(final == "complete" for final, _ in after), [error_text(e) for _, e in after]
    health = httpx.get(f"{d.frontend.url}/health").json()
    assert [b["healthy"] for b in health["backends"]] == [True, False]

    second.proc.wait(10)
    revived = two.start_second("backend2b.log")  # left running for the other tests (the fixture stops it)
    rejoined = wait_for(
        lambda: all(b["healthy"] for b in httpx.get(f"{d.frontend.url}/health").json()["backends"]), 15, 0.3
    )
    assert rejoined, "the revived GPU tier did not rejoin"
    _burst(d.frontend.url, 8, "10.5.0")
    assert _finished(revived.url) > 0, "the rejoined GPU tier got no work"
