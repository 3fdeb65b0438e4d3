"""The README's curl snippet, run as written (only the URL changed) against the real tiers."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support import REPO, Deployment

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

DOCS = [REPO / "README.md", REPO / "docs" / "clients.md"]


def curl_block(path: Path) -> str:
    """The first ```bash block of a Markdown file that calls gradio_api/call/generate."""
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", path.read_text(), flags=re.S | re.M):
        if "gradio_api/call/generate" in block and "curl" in block:
            return block
    raise AssertionError(f"{path.name} has no bash block with a curl call to gradio_api/call/generate")


def with_url(block: str, url: str) -> str:
    script, n = re.subn(r"^URL=.*$", f"URL={url}", block, flags=re.M)
    assert n == 1, "the curl snippet should set the frontend's address once, as URL=..."
    return script


def last_complete(stdout: str) -> list:
    event, data = None, None
    for line in stdout.splitlines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "complete":
            data = json.loads(line[5:].strip())
    assert data is not None, stdout
    return data


@pytest.mark.parametrize("doc", [p for p in DOCS if p.exists()], ids=lambda p: p.name)
def test_curl_snippet_runs(tiny: Deployment, doc: Path) -> None:
    script = with_url(curl_block(doc), tiny.frontend.url)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "event: complete" in proc.stdout, proc.stdout
    image, info = last_complete(proc.stdout)
    assert {"seed", "width", "height", "steps", "model"} <= set(info)
    r = httpx.get(image["url"], timeout=10)
    r.raise_for_status()
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(io.BytesIO(r.content)).size == (info["width"], info["height"])
