"""schemathesis over each tier: 0 server errors, 0 broken replies.

The frontend through its ``/gradio_api/openapi.json`` (the app's API); the GPU tier, whose
Gradio app has no endpoint, through its routes for the frontend (``fuzz_gpu_tier.json``),
each request signed with a fresh identity token as the frontend signs them.

First release (schemathesis 4.32.5, 60 s): 364 HTTP 5xx and 15 broken-off replies on the
frontend, 215 and 10 on the GPU tier in 40 s, and 55,000 lines of log.

Time-boxed: ``SPLITSPACE_FUZZ_SECONDS`` per tier (default 20; run by hand with 60). The
run is schemathesis' own CLI as a subprocess (its coverage and fuzzing phases, positive
and negative data), with one extra check loaded from ``tests/fuzz_checks.py``: an event
stream must end with ``complete`` or ``error``, and an error must carry a title; and
one body generator: about one body in four goes past a parser limit (nesting, number
literals, items; issue 21), and at least one such body must be refused by name. The
counts come from its NDJSON report: every response's status, and every network error
(a reply broken off mid-stream is a ``ChunkedEncodingError`` there).
"""

from __future__ import annotations

import base64
import collections
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QUOTAS
from tests.fuzz_checks import CHECK_NAME, LIMIT_NAMED
from tests.support import Deployment

pytest.importorskip("schemathesis")

SECONDS = int(os.environ.get("SPLITSPACE_FUZZ_SECONDS", "20"))
HOOKS = Path(__file__).with_name("fuzz_checks.py")
GPU_TIER_ROUTES = Path(__file__).with_name("fuzz_gpu_tier.json")
"""The GPU tier's routes for the frontend (the call route, standing, health) as OpenAPI."""
LOG_BYTES_PER_REQUEST = 200

GENEROUS = QUOTAS.replace("requests_per_minute = 1000", "requests_per_minute = 100000")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Both tiers on their own (the fuzzer's load must not reach other tests' quotas)."""
    d = Deployment(tmp_path_factory.mktemp("fuzz"), model="sleep:1", quotas=GENEROUS, trusted_proxies=0)
    d.start()
    yield d
    d.stop()


def run_schemathesis(
    base_url: str, report_dir: Path, seconds: int, *, schema: Path | None = None, secret: str | None = None
) -> dict[str, Any]:
    """Run the CLI for ``seconds`` over ``schema`` (default: the tier's Gradio API); the
    counts from its NDJSON report. ``secret``: sign each request as the frontend would."""
    where = [str(schema), "--url", base_url] if schema is not None else [f"{base_url}/gradio_api/openapi.json"]
    cmd = [
        sys.executable,
        "-c",
        "from schemathesis.cli import schemathesis; schemathesis()",
        "run",
        *where,
        "--max-time",
        str(seconds),
        "--checks",
        f"not_a_server_error,{CHECK_NAME}",
        "--request-timeout",
        "15",
        "--no-shrink",
        "--workers",
        "2",
        "--report",
        "ndjson",
        "--report-dir",
        str(report_dir),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), **({"SPLITSPACE_FUZZ_SECRET": secret} if secret else {})}
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=seconds + 240, cwd=report_dir.parent
    )  # its cache folder (.schemathesis/) goes there, not in the repo
    reports = list(report_dir.glob("*.ndjson"))  # --report-dir is absolute
    assert reports, f"schemathesis wrote no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    statuses: collections.Counter[tuple[str, int | None]] = collections.Counter()
    network_errors: list[str] = []
    check_failures: list[str] = []
    limit_refusals = 0
    for line in reports[0].read_text().splitlines():
        event = json.loads(line)
        kind, body = next(iter(event.items()))
        if kind == "NonFatalError":
            network_errors.append(f"{body['label']}: {body['value']['type']}: {body['value']['message'][:200]}")
        elif kind == "ScenarioFinished":
            recorder = body["recorder"]
            for interaction in (recorder.get("interactions") or {}).values():
                response = interaction.get("response")
                statuses[(recorder["label"], response["status_code"] if response else None)] += 1
                limit_refusals += _names_a_parser_limit(response)
            for checks in (recorder.get("checks") or {}).values():
                check_failures += [
                    f"{recorder['label']}: {c['name']}"
                    for c in checks
                    if c["status"] == "failure" and c["name"] == CHECK_NAME
                ]
    return {
        "statuses": statuses,
        "network_errors": network_errors,
        "check_failures": check_failures,
        "limit_refusals": limit_refusals,
        "output": done.stdout[-4000:],
    }


def _names_a_parser_limit(response: dict[str, Any] | None) -> bool:
    """A 4xx whose ``{"title", "message"}`` names a parser limit: one of the odd bodies of
    ``fuzz_checks.py`` (nesting, numbers, items), refused as it should be."""
    if not response or not 400 <= response["status_code"] < 500:
        return False
    content = (response.get("content") or {}).get("$base64")
    try:
        doc = json.loads(base64.b64decode(content)) if content else None
    except ValueError:
        return False
    return isinstance(doc, dict) and str(doc.get("message", "")).startswith(LIMIT_NAMED)


@pytest.mark.timeout(SECONDS + 300)
@pytest.mark.parametrize("tier", ["frontend", "backend"])
def test_schemathesis_finds_no_server_error_and_no_broken_reply(fuzzed: Deployment, tier: str, tmp_path: Path) -> None:
    proc = fuzzed.frontend if tier == "frontend" else fuzzed.backend
    assert proc is not None
    log_before = proc.log_path.stat().st_size
    if tier == "frontend":  # its public face: the app's Gradio API
        result = run_schemathesis(proc.url, tmp_path / "report", SECONDS)
    else:  # the GPU tier's Gradio app has no endpoint: its routes for the frontend, signed as it signs
        result = run_schemathesis(proc.url, tmp_path / "report", SECONDS, schema=GPU_TIER_ROUTES, secret=fuzzed.secret)
    statuses = result["statuses"]
    total = sum(statuses.values())
    server_errors = {k: v for k, v in statuses.items() if k[1] is not None and k[1] >= 500}
    print(
        f"\n{tier}: {total} requests in {SECONDS} s, {sum(server_errors.values())} server errors, "
        f"{len(result['network_errors'])} broken replies, {len(result['check_failures'])} unclean streams, "
        f"{result['limit_refusals']} bodies past a parser limit refused"
    )
    for (label, status), count in sorted(statuses.items(), key=str):
        print(f"  {count:5d}  {status}  {label}")
    assert total >= 50, f"too few requests to mean anything:\n{result['output']}"
    assert not server_errors, server_errors
    assert not result["network_errors"], result["network_errors"][:10]
    assert not result["check_failures"], result["check_failures"][:10]
    assert result["limit_refusals"] > 0, "no body past a parser limit was refused by name (fuzz_checks.flatmap_body)"
    grown = proc.log_path.stat().st_size - log_before
    assert grown <= total * LOG_BYTES_PER_REQUEST, f"{grown} bytes of log for {total} requests"
