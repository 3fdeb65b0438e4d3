"""The GPU tier loads another model live: in-flight requests finish on the old one, none is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx

from tests.clients import call_rest, error_text, gen_args
from tests.support import REPO, Deployment


def cli(d: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPLITSPACE_BACKEND_URL": d.backend.url, "SPLITSPACE_ADMIN_TOKEN": d.admin_token}
    return subprocess.run([sys.executable, "-m", "deploy.cli", "model", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_model_changes_without_restart_and_nothing_is_refused(tmp_path):
    d = Deployment(tmp_path, model="sleep:400").start()
    try:
        results: list[tuple[str, list]] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            with httpx.Client(timeout=120) as c:
                r = call_rest(c, d.frontend.url, "generate", gen_args(seed=i), {"x-forwarded-for": f"10.1.0.{i}"})
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.6)  # some are running or queued on the old model
        changed = cli(d, "set", "sleep:10")
        assert changed.returncode == 0, changed.stderr
        assert "sleep:400 -> sleep:10" in changed.stdout
        for t in threads:
            t.join()
        assert all(final == "complete" for final, _ in results), [error_text(e) for _, e in results]
        models = [events[-1][1][1]["model"] for _, events in results]
        assert "sleep:400" in models  # in flight when the change came: finished on the old model
        assert "sleep:10" in models  # queued then: waited for the new one
        assert httpx.get(f"{d.backend.url}/health").json()["model"] == "sleep:10"
        assert cli(d, "show").stdout.strip() == "sleep:10"

        bad = cli(d, "set", "sleep:abc")
        assert bad.returncode != 0 and "sleep:abc" in bad.stderr and "Traceback" not in bad.stderr
        assert cli(d, "show").stdout.strip() == "sleep:10"

        assert cli(d, "set", "tiny").returncode == 0  # a real diffusers pipeline, loaded live
        with httpx.Client(timeout=120) as c:
            final, events = call_rest(c, d.frontend.url, "generate", gen_args(width=96, height=64))
        assert final == "complete" and events[-1][1][1]["model"] == "tiny"
    finally:
        d.stop()
