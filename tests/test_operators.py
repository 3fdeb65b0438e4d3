"""Operators at work on running tiers (``sleep:300``): the quota file's hot reload, the
``splitspace quota`` CLI, changes while a client runs, a GPU-tier restart, and /metrics."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from gradio_client import Client
from typer.testing import CliRunner

from splitspace.deploy.cli import app as cli_app
from splitspace.shared.contract.headers import ADMIN_HEADER
from tests.clients import call_rest, error_text, gen_args, splitspace_cli
from tests.support import GPU_TIER_BACKLOG, Deployment, free_port, keys_toml, start_tier, wait_for

JOB_S = 0.3  # sleep:300

KEYS = {
    "reloader": "reload",
    "cli": "ops",
    "busy": "ops",
    "keeper": "ops",
    "meter": "mtier",
    "closed": "closed",
}


def quotas(reload_max_queued: int = 4, extra_reload_line: str = "") -> str:
    return f"""
[tiers.ops]
weight = 1
max_running = 1
max_queued = 4
gpu_seconds = 600
window_s = 3600

[tiers.reload]
weight = 1
max_running = 1
max_queued = {reload_max_queued}
{extra_reload_line}gpu_seconds = 600
window_s = 3600

[tiers.mtier]
weight = 1
max_running = 1
max_queued = 4
gpu_seconds = 600
window_s = 3600

# every request is refused at the GPU tier (Queue full)
[tiers.closed]
weight = 1
max_running = 1
max_queued = 0
gpu_seconds = 600
window_s = 3600

[clients."key:busy"]
max_queued = 12
""" + keys_toml(KEYS, lambda name: f"ops-{name}-key")


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer ops-{name}-key"}


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(
        tmp_path_factory.mktemp("ops"), model="sleep:300", quotas=quotas(), frontend_env=dict(GPU_TIER_BACKLOG)
    )
    d.start()
    yield d
    d.stop()


# -- helpers ------------------------------------------------------------------------------
def generate(d: Deployment, name: str) -> tuple[str, list[tuple[str, Any]]]:
    with httpx.Client(timeout=120) as c:
        return call_rest(c, d.frontend.url, "generate", gen_args(), bearer(name))


def standing(d: Deployment, name: str) -> dict[str, Any]:
    """The key's own /quota, asked of the frontend as that key."""
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, d.frontend.url, "quota", [], bearer(name))
    assert final == "complete", events
    return events[-1][1][0]


def admin(d: Deployment, method: str, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = {ADMIN_HEADER: d.admin_token if token is None else token}
    return httpx.request(method, f"{d.backend.url}/admin{path}", headers=headers, timeout=10, **kwargs)


def cli(d: Deployment, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """``splitspace quota ...`` as an operator runs it, configured by environment."""
    env = {
        "SPLITSPACE_BACKEND_URL": d.backend.url,
        "SPLITSPACE_ADMIN_TOKEN": d.admin_token if token is None else token,
        "COLUMNS": "200",
    }
    return splitspace_cli("quota", *args, env=env)


def cli_json(d: Deployment, *args: str) -> Any:
    done = cli(d, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def rewrite_quotas(d: Deployment, text: str) -> None:
    """Replace the quota file atomically (write a temporary file, then rename), with a newer mtime."""
    path = d.quotas_path
    old = path.stat().st_mtime
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    stamp = max(time.time(), old + 1.5)
    os.utime(tmp, (stamp, stamp))
    os.replace(tmp, path)
    d.quotas = text


def metrics_text(d: Deployment) -> str:
    return httpx.get(f"{d.backend.url}/metrics", timeout=10).text


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def mtier_depth(d: Deployment) -> tuple[float, float]:
    """(queued, running) of tier "mtier", as /metrics shows them."""
    text = metrics_text(d)
    return (
        sample(text, "splitspace_queued", 'tier="mtier"') or 0.0,
        sample(text, "splitspace_running", 'tier="mtier"') or 0.0,
    )


_probes = itertools.count(1)


def wait_until_the_frontend_has_the_overrides(d: Deployment) -> None:
    """Wait until the frontend knows the in-flight cap of every override set so far.

    It learns them from the GPU tier's health document (every 2 s). The probe: a cap of 0
    set now on an address never seen before, which the frontend refuses by itself (the GPU
    tier refuses it too, with another message) once a health document holding it, and so
    every earlier override, has reached the frontend."""
    n = next(_probes)
    address = f"10.250.{n // 250}.{n % 250 + 1}"
    probe = f"/clients/addr:{address}"
    assert admin(d, "PUT", probe, json={"max_running": 0, "max_queued": 0}).status_code == 200

    def refused_by_the_frontend() -> bool:
        with httpx.Client(timeout=60) as c:
            final, events = call_rest(c, d.frontend.url, "generate", gen_args(), {"x-forwarded-for": address})
        return final == "error" and "(max_running + max_queued = 0)" in error_text(events)

    try:
        assert wait_for(refused_by_the_frontend, 20, 0.2), "the frontend never learned the live caps"
    finally:
        admin(d, "DELETE", probe)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


# -- hot reload ---------------------------------------------------------------------------
def test_quota_file_hot_reload_and_bad_edit_keeps_last_good(ops):
    client = Client(ops.frontend.url, verbose=False, headers=bearer("reloader"))
    try:
        assert client.predict(api_name="/quota")["limits"]["max_queued"] == 4

        rewrite_quotas(ops, quotas(reload_max_queued=9))
        # both tiers poll the file every second; /quota shows the GPU tier's limits once it has it
        assert wait_for(lambda: client.predict(api_name="/quota")["limits"]["max_queued"] == 9, 15, 0.2), (
            client.predict(api_name="/quota")
        )
        assert admin(ops, "GET", "/quotas").json()["last_error"] is None

        bad = quotas(reload_max_queued=9, extra_reload_line="max_queue = 3\n")
        bad_line = bad.splitlines().index("max_queue = 3") + 1
        rewrite_quotas(ops, bad)
        status = wait_for(lambda: admin(ops, "GET", "/quotas").json()["last_error"], 6, 0.2)
        assert status, "the bad file was not noticed"
        assert f"line {bad_line}" in status and "max_queue" in status and "unknown key" in status, status
        # the last good version stays in force on the GPU tier (and the key still works on the frontend)
        assert client.predict(api_name="/quota")["limits"]["max_queued"] == 9
        assert f"line {bad_line}" in ops.backend.log()
    finally:
        rewrite_quotas(ops, quotas())
        client.close()
    assert wait_for(lambda: admin(ops, "GET", "/quotas").json()["last_error"] is None, 6, 0.2)
    assert wait_for(lambda: standing(ops, "reloader")["limits"]["max_queued"] == 4, 6, 0.2)


# -- the CLI ------------------------------------------------------------------------------
def test_quota_cli_list_show_set_clear_reset(ops):
    assert generate(ops, "cli")[0] == "complete"

    done = cli(ops, "list")
    assert done.returncode == 0, done.stderr
    assert "key:cli" in done.stdout and "ops" in done.stdout
    rows = cli_json(ops, "list")
    mine = [r for r in rows if r["client"] == "key:cli"]
    assert mine and mine[0]["used"] > 0, rows

    done = cli(ops, "show", "key:cli")
    assert done.returncode == 0, done.stderr
    assert "key:cli" in done.stdout and "limits:" in done.stdout
    shown = cli_json(ops, "show", "key:cli")
    assert shown["tier"] == "ops" and shown["used"] > 0 and shown["overrides"] == {}

    changed = cli_json(ops, "set", "key:cli", "--max-queued", "7", "--weight", "2")
    assert changed["overrides"] == {"max_queued": 7, "weight": 2.0}
    assert changed["limits"]["max_queued"] == 7 and changed["limits"]["weight"] == 2.0
    limits = standing(ops, "cli")["limits"]  # the next request sees the override
    assert limits["max_queued"] == 7 and limits["weight"] == 2.0

    cleared = cli_json(ops, "clear", "key:cli")
    assert cleared["overrides"] == {}
    assert standing(ops, "cli")["limits"]["max_queued"] == 4

    reset = cli_json(ops, "reset", "key:cli")
    assert reset["used"] == 0
    assert standing(ops, "cli")["used"] == 0


def test_quota_cli_errors_are_one_clear_line(ops):
    line = one_line_error(cli(ops, "list", token="not-the-token"))
    assert "401" in line and "token" in line, line
    assert "not-the-token" not in line

    line = one_line_error(cli(ops, "set", "key:cli", "--max-queued", "-1"))
    assert "max_queued" in line and "negative" in line, line
    assert cli_json(ops, "show", "key:cli")["overrides"] == {}


def _ops_cli(d: Deployment, *args: str) -> Any:
    """``splitspace quota ...`` in this process (typer's CliRunner), against the real GPU tier."""
    env = {"SPLITSPACE_BACKEND_URL": d.backend.url, "SPLITSPACE_ADMIN_TOKEN": d.admin_token, "COLUMNS": "200"}
    return CliRunner().invoke(cli_app, ["quota", *args], env=env)


def test_quota_set_refuses_a_key_the_quota_file_does_not_list(ops):
    """Issue 21: `quota set key:typo` created an override for a client that cannot exist, silently."""
    for extra in ((), ("--force",)):  # no API key of that name can ever call
        done = _ops_cli(ops, "set", "key:clii", "--max-queued", "3", *extra)
        assert done.exit_code == 1, done.output
        line = done.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, line
        assert "no API key named 'clii' in the quota file" in line, line
        assert "key:cli" in line and "key:keeper" in line, line  # the known keys, to pick from
    done = _ops_cli(ops, "set", "clii", "--max-queued", "3")
    assert done.exit_code == 1 and "not a client id: give key:NAME, session:ID or addr:ADDRESS" in done.stderr
    listed = {row["client"] for row in admin(ops, "GET", "/clients").json()}
    assert "key:clii" not in listed and "clii" not in listed
    # the admin API itself (the dashboard's way in too) refuses it, naming the reason
    r = admin(ops, "PUT", "/clients/key:clii", json={"max_queued": 3})
    assert r.status_code == 404 and "no API key named 'clii'" in r.json()["detail"]


def test_quota_set_refuses_a_session_or_address_never_seen_unless_forced(ops):
    done = _ops_cli(ops, "set", "session:never-seen", "--max-queued", "3")
    assert done.exit_code == 1, done.output
    assert "does not know session:never-seen" in done.stderr and "--force" in done.stderr, done.stderr
    assert admin(ops, "GET", "/clients/session:never-seen").json()["overrides"] == {}

    forced = _ops_cli(ops, "set", "session:never-seen", "--max-queued", "3", "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["overrides"] == {"max_queued": 3}
    assert _ops_cli(ops, "clear", "session:never-seen").exit_code == 0

    # An address that has used the GPU is known: no --force needed.
    with httpx.Client(timeout=60, transport=httpx.HTTPTransport(local_address="127.0.0.23")) as c:
        final, events = call_rest(c, ops.frontend.url, "generate", gen_args())
    assert final == "complete", error_text(events)
    done = _ops_cli(ops, "set", "addr:127.0.0.23", "--max-queued", "6", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["overrides"] == {"max_queued": 6}
    assert _ops_cli(ops, "clear", "addr:127.0.0.23").exit_code == 0


def test_admin_api_is_404_without_a_token_configured(ops, tmp_path):
    env = {
        **ops.common_env(),
        "SPLITSPACE_MODEL": "sleep:0",
        "SPLITSPACE_ADMIN_TOKEN": "",
        "SPLITSPACE_STATE_PATH": str(tmp_path / "state.sqlite3"),
    }
    bare = start_tier("backend", free_port(), env, tmp_path / "backend.log")
    try:
        for headers in ({}, {ADMIN_HEADER: ops.admin_token}, {"authorization": f"Bearer {ops.admin_token}"}):
            for path in ("/admin/clients", "/admin/quotas", "/admin/clients/key:cli"):
                assert httpx.get(bare.url + path, headers=headers, timeout=10).status_code == 404
            assert (
                httpx.put(
                    bare.url + "/admin/clients/key:cli", json={"max_queued": 100}, headers=headers, timeout=10
                ).status_code
                == 404
            )
    finally:
        bare.stop()


# -- changes while a client runs ----------------------------------------------------------
def test_lowering_max_queued_while_a_client_runs(ops):
    """key:busy has a backlog; `quota set key:busy --max-queued 1` refuses new requests at once
    (at the GPU tier, or at the frontend once it learns the new cap), while what was already
    admitted finishes."""
    env = {"SPLITSPACE_BACKEND_URL": ops.backend.url, "SPLITSPACE_ADMIN_TOKEN": ops.admin_token}
    runner = CliRunner()
    # 11 in flight: the frontend's own cap (max_running + max_queued = 13) lets the next two through
    with ThreadPoolExecutor(11) as pool:
        backlog = [pool.submit(generate, ops, "busy") for _ in range(11)]
        try:
            assert wait_for(lambda: admin(ops, "GET", "/clients/key:busy").json()["queued"] >= 6, 20, 0.05)
            result = runner.invoke(cli_app, ["quota", "set", "key:busy", "--max-queued", "1", "--json"], env=env)
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout)["limits"]["max_queued"] == 1

            refused = [generate(ops, "busy") for _ in range(2)]
            queued_after = admin(ops, "GET", "/clients/key:busy").json()["queued"]
            for final, events in refused:
                assert final == "error", (events, queued_after)
                text = error_text(events)
                # refused by the GPU tier, or already by the frontend once it has learned the
                # new cap (max_running 1 + max_queued 1) from the GPU tier
                assert text.startswith("Queue full:"), text
                assert "max_queued=1" in text or "max_running + max_queued = 2" in text, text
            assert queued_after >= 1  # the refusals were made while the backlog still waited
        finally:
            finished = [f.result(timeout=120) for f in backlog]
    assert all(final == "complete" for final, _ in finished), [error_text(ev) for _, ev in finished]
    # with its queue empty, the client is served again under the new limit
    assert generate(ops, "busy")[0] == "complete"
    assert runner.invoke(cli_app, ["quota", "clear", "key:busy"], env=env).exit_code == 0


# -- restart ------------------------------------------------------------------------------
def test_gpu_tier_restart_keeps_usage_and_overrides(ops):
    for _ in range(2):
        assert generate(ops, "keeper")[0] == "complete"
    changed = cli_json(ops, "set", "key:keeper", "--max-queued", "2")
    assert changed["overrides"] == {"max_queued": 2}
    before = cli_json(ops, "show", "key:keeper")
    assert before["used"] >= 2 * JOB_S * 0.9, before

    ops.backend.stop()
    ops.start_backend()  # same port, same state file

    after = cli_json(ops, "show", "key:keeper")
    assert after["used"] == pytest.approx(before["used"], abs=0.01), (before, after)
    assert after["overrides"] == {"max_queued": 2}
    assert after["tier"] == "ops" and after["limits"]["max_queued"] == 2, after

    seen = wait_for(lambda: _try_standing(ops, "keeper"), 20, 0.5)  # the frontend reconnects
    assert seen, "the frontend did not reach the restarted GPU tier"
    assert seen["used"] == pytest.approx(before["used"], abs=0.01)
    assert seen["limits"]["max_queued"] == 2
    assert cli_json(ops, "clear", "key:keeper")["overrides"] == {}


def _try_standing(d: Deployment, name: str) -> dict[str, Any] | None:
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, d.frontend.url, "quota", [], bearer(name))
    return events[-1][1][0] if final == "complete" else None


# -- metrics ------------------------------------------------------------------------------
@pytest.mark.serial  # it must see the one running job in a window of 1.2 s: run alone (scripts/test)
def test_metrics_show_depth_waits_gpu_time_and_refusals(ops):
    text = metrics_text(ops)
    for family, kind in (
        ("splitspace_queued", "gauge"),
        ("splitspace_running", "gauge"),
        ("splitspace_wait_seconds", "histogram"),
        ("splitspace_gpu_seconds_total", "counter"),
        ("splitspace_refusals_total", "counter"),
    ):
        assert f"# TYPE {family} {kind}" in text, family
    refusals_before = sample(text, "splitspace_refusals_total", 'reason="queue_full"') or 0.0

    most_running = [0.0]
    stop = threading.Event()

    def scrape() -> None:  # measurement: mtier (max_running = 1) never shows more than one running
        while not stop.is_set():
            most_running[0] = max(most_running[0], mtier_depth(ops)[1])
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            # held by an override (max_running 0): its jobs queue and none starts
            assert admin(ops, "PUT", "/clients/key:meter", json={"max_running": 0}).status_code == 200
            jobs = [pool.submit(generate, ops, "meter") for _ in range(3)]
            try:
                held = wait_for(lambda: mtier_depth(ops) == (3, 0), 30, 0.05)
            finally:
                assert admin(ops, "DELETE", "/clients/key:meter").status_code == 200
                # limits are read at the next dispatch: this fourth request's admission makes one
                jobs.append(pool.submit(generate, ops, "meter"))
            assert held, mtier_depth(ops)
            assert wait_for(lambda: mtier_depth(ops)[1] == 1, 30, 0.02), mtier_depth(ops)
            results = [f.result(timeout=60) for f in jobs]
    finally:
        stop.set()
        scraper.join()
    assert all(final == "complete" for final, _ in results), [error_text(ev) for _, ev in results]
    assert most_running[0] <= 1, most_running

    final, events = generate(ops, "closed")
    assert final == "error" and error_text(events).startswith("Queue full:"), events

    text = metrics_text(ops)
    assert sample(text, "splitspace_wait_seconds_count", 'tier="mtier"') == 4
    assert sample(text, "splitspace_wait_seconds_bucket", 'le="+Inf",tier="mtier"') == 4
    assert (sample(text, "splitspace_wait_seconds_sum", 'tier="mtier"') or -1) >= 0
    gpu = sample(text, "splitspace_gpu_seconds_total", 'tier="mtier"') or 0.0
    assert 4 * JOB_S * 0.9 <= gpu <= 4 * JOB_S * 3, gpu
    assert (sample(text, "splitspace_refusals_total", 'reason="queue_full"') or 0.0) >= refusals_before + 1
    # after the work, nothing of this tier is left queued or running
    assert (sample(text, "splitspace_queued", 'tier="mtier"') or 0.0) == 0
    assert (sample(text, "splitspace_running", 'tier="mtier"') or 0.0) == 0


# -- raising a limit with the CLI ----------------------------------------------------------
def test_raising_max_queued_with_the_cli_lets_more_in(ops):
    """The emergency the contract names: an operator raises one client's max_queued above its
    tier's; the extra requests must be admitted, not refused early by the frontend."""
    assert cli_json(ops, "set", "key:cli", "--max-queued", "7")["limits"]["max_queued"] == 7
    try:
        wait_until_the_frontend_has_the_overrides(ops)  # from the GPU tier's health check, no request of its own
        with ThreadPoolExecutor(8) as pool:  # 1 running + 7 queued
            results = [f.result(timeout=60) for f in [pool.submit(generate, ops, "cli") for _ in range(8)]]
        errors = [error_text(events) for final, events in results if final != "complete"]
        assert not errors, errors
    finally:
        assert cli_json(ops, "clear", "key:cli")["overrides"] == {}
