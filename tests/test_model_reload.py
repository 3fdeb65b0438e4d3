"""The GPU tier loads another model live: in-flight requests finish on the old one, none is refused.

The GPU tier runs in this process so that its first job can be held on the GPU until the
model change is waiting for it (a real model cannot be held on demand); the frontend and
the ``splitspace model`` CLI are real processes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading

import httpx

from splitspace.shared.config.settings import Settings
from tests.clients import call_rest, error_text, gen_args
from tests.support import REPO, free_port, gpu_depth, held_model, serve_gpu_tier_with, start_tier, wait_for


def cli(backend_url: str, admin_token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPLITSPACE_BACKEND_URL": backend_url, "SPLITSPACE_ADMIN_TOKEN": admin_token}
    return subprocess.run(
        [sys.executable, "-m", "splitspace.deploy.cli", "model", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_model_changes_without_restart_and_nothing_is_refused(tmp_path):
    secret, admin_token = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    release = threading.Event()  # the old model's jobs wait for it
    settings = Settings(
        secret=secret, admin_token=admin_token, model="sleep:400", state_path=tmp_path / "state.sqlite3"
    )
    with serve_gpu_tier_with(settings, held_model("sleep:400", release)) as (gpu_url, tier):
        env = {"SPLITSPACE_SECRET": secret, "SPLITSPACE_BACKEND_URL": gpu_url, "SPLITSPACE_TRUSTED_PROXIES": "1"}
        frontend = start_tier("frontend", free_port(), env, tmp_path / "frontend.log")
        try:
            results: list[tuple[str, list]] = []
            lock = threading.Lock()

            def one(i: int) -> None:
                with httpx.Client(timeout=120) as c:
                    r = call_rest(c, frontend.url, "generate", gen_args(seed=i), {"x-forwarded-for": f"10.1.0.{i}"})
                with lock:
                    results.append(r)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            # one is on the GPU (held there), three wait behind it, all on the old model
            assert wait_for(lambda: gpu_depth(gpu_url) == (3, 1), 60, 0.05), gpu_depth(gpu_url)

            changed: list[subprocess.CompletedProcess[str]] = []
            change = threading.Thread(target=lambda: changed.append(cli(gpu_url, admin_token, "set", "sleep:10")))
            change.start()
            # the change holds dispatch and waits for the job on the GPU to finish
            assert wait_for(lambda: tier.runner.paused, 60, 0.02), "the model change never started"
            assert gpu_depth(gpu_url) == (3, 1)
            release.set()
            change.join(timeout=120)
            assert changed and changed[0].returncode == 0, changed and changed[0].stderr
            assert "sleep:400 -> sleep:10" in changed[0].stdout

            for t in threads:
                t.join()
            assert all(final == "complete" for final, _ in results), [error_text(e) for _, e in results]
            models = sorted(events[-1][1][1]["model"] for _, events in results)
            # in flight when the change came: finished on the old model; queued then: waited for the new one
            assert models == ["sleep:10", "sleep:10", "sleep:10", "sleep:400"], models
            assert httpx.get(f"{gpu_url}/health").json()["model"] == "sleep:10"
            assert cli(gpu_url, admin_token, "show").stdout.strip() == "sleep:10"

            bad = cli(gpu_url, admin_token, "set", "sleep:abc")
            assert bad.returncode != 0 and "sleep:abc" in bad.stderr and "Traceback" not in bad.stderr
            assert cli(gpu_url, admin_token, "show").stdout.strip() == "sleep:10"

            assert cli(gpu_url, admin_token, "set", "tiny").returncode == 0  # a real diffusers pipeline, loaded live
            with httpx.Client(timeout=120) as c:
                final, events = call_rest(c, frontend.url, "generate", gen_args(width=96, height=64))
            assert final == "complete" and events[-1][1][1]["model"] == "tiny"
        finally:
            release.set()
            frontend.stop()
