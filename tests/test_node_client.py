"""/generate from Node with the official JS client (``@gradio/client``), as ``tests/node/generate.mjs`` calls it.

The client's dependencies are pinned by ``tests/node/package-lock.json``; ``npm ci`` installs
them on first use. Skipped only where there is no ``node``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import key
from tests.support import Deployment

NODE_DIR = Path(__file__).resolve().parent / "node"
SCRIPT = NODE_DIR / "generate.mjs"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture(scope="module")
def node_client() -> Path:
    if not (NODE_DIR / "node_modules" / "@gradio" / "client").is_dir():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install tests/node's dependencies (npm ci)"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300, capture_output=True
        )
    return SCRIPT


def run_node(
    script: Path, url: str, params: dict[str, Any] | None = None, api_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SPLITSPACE_API_KEY"}
    if api_key:
        env["SPLITSPACE_API_KEY"] = api_key
    args = ["node", str(script), url] + ([json.dumps(params)] if params else [])
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_node_client_generates(tiny: Deployment, node_client: Path) -> None:
    proc = run_node(node_client, tiny.frontend.url, {"seed": 11, "width": 96, "height": 64})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    info = out["info"]
    assert info["seed"] == 11 and info["width"] == 96 and info["height"] == 64
    assert info["steps"] == 1 and info["model"] == "tiny"
    r = httpx.get(out["image_url"], timeout=10)
    r.raise_for_status()
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size == (96, 64)


def test_node_client_with_api_key(tiny: Deployment, node_client: Path) -> None:
    proc = run_node(node_client, tiny.frontend.url, {"seed": 12}, api_key=key("beta"))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])["info"]
    assert info["seed"] == 12 and info["client"] == "key:beta"


def test_node_client_sees_validation_error(tiny: Deployment, node_client: Path) -> None:
    proc = run_node(node_client, tiny.frontend.url, {"width": 100})
    assert proc.returncode == 1
    assert "Width: must be in steps of 8" in proc.stderr, proc.stderr[-500:]  # the input by its label
