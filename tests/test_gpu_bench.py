"""bench/gpu.py runs end to end on a CPU (``--cpu-smoke``) and prints its tables with real figures.

The same script is what runs on a GPU; this keeps it from rotting between GPU runs:
the raw pipeline at two batch sizes, both tiers started for real, two client rows
through the frontend's REST API, the goal lines.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def test_cpu_smoke_prints_both_tables_with_numeric_figures(tmp_path):
    figures_path = tmp_path / "figures.json"
    out = subprocess.run(
        [sys.executable, "bench/gpu.py", "--cpu-smoke", "--json", str(figures_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout

    assert "== raw diffusers: arch:sd-turbo@tiny, 64x64, 1 step(s), guidance 0, cpu float32 ==" in text
    raw = re.findall(rf"^\s+(\d+)\s+(\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+n/a$", text, re.M)
    assert [int(row[0]) for row in raw] == [1, 4], text
    for _batch, calls, images_s, p50, p95, step in raw:
        assert int(calls) >= 2
        assert float(images_s) > 0 and float(step) > 0
        assert 0 < float(p50) <= float(p95)

    assert "SPLITSPACE_MAX_BATCH=4, SPLITSPACE_BATCH_WAIT_MS=5" in text
    served = re.findall(
        rf"^\s+(\d+)\s+(\d+)\s+(\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})x b(\d+)\s+"
        rf"(-|{NUMBER}%)\s+(-|{NUMBER}%)\s+({NUMBER})ms\s+n/a\s+(\d+)$",
        text,
        re.M,
    )
    assert [(int(r[0]), int(r[1])) for r in served] == [(1, 1), (4, 1)], text
    for clients, _, images, images_s, p50, p95, ratio, batch, shares, counts, gpu_ms, failed in served:
        assert int(failed) == 0
        assert int(images) >= int(clients)
        assert float(images_s) > 0 and float(ratio) > 0 and float(gpu_ms) > 0
        assert 0 < float(p50) <= float(p95)
        assert int(batch) == int(clients)  # compared with raw at the same batch
        assert (shares == "-") == (counts == "-") == (clients == "1")
    assert re.search(r"^goal: lone client p50 <= raw batch 1 \+ 10 ms: [-+]\d", text, re.M)
    assert re.search(r"^goal: 4 clients' shares within 5%: \d", text, re.M)

    figures = json.loads(figures_path.read_text())  # the same run, for tools
    assert [r["batch"] for r in figures["raw"]] == [1, 4]
    assert [r["images"] for r in figures["served"]] == [int(r[2]) for r in served]
    assert all(r["gpu_util"] is None for r in figures["raw"] + figures["served"])
    assert all(math.isfinite(r["images_per_s"]) for r in figures["raw"] + figures["served"])
