"""Small helpers the tests use to call the tiers as outside clients do."""

from __future__ import annotations

import json
import os
import subprocess
import traceback
from collections.abc import Callable
from typing import Any

import httpx

from splitspace.session.identity import Identity
from splitspace.session.token import IdentityTokens, call_purpose
from splitspace.shared.contract import frames
from splitspace.shared.contract.calls import CALL_PATH, Call
from splitspace.shared.contract.errors import from_wire
from splitspace.shared.contract.headers import IDENTITY_HEADER
from splitspace.shared.contract.schema import REQUEST_FIELDS

GENERATE_DEFAULTS: dict[str, Any] = dict(
    prompt="a red fox", negative_prompt="", width=64, height=64, steps=1, guidance_scale=0.0, seed=1
)


def gen_args(**overrides: Any) -> list[Any]:
    values = {**GENERATE_DEFAULTS, **overrides}
    return [values[k] for k in REQUEST_FIELDS]


def call_rest(
    client: httpx.Client, base_url: str, api: str, data: list[Any], headers: dict[str, str] | None = None
) -> tuple[str, list[tuple[str, Any]]]:
    """The curl flow: POST /gradio_api/call/<api>, then read its event stream.

    Returns (final event name, every (event, data) pair)."""
    r = client.post(f"{base_url}/gradio_api/call/{api}", json={"data": data}, headers=headers or {})
    if r.status_code in (401, 422, 429) and "title" in r.json():  # refused at the door, before Gradio
        doc = r.json()
        return "error", [("refused", doc), ("error", f"{doc['title']}: {doc['message']}")]
    if r.status_code == 422 and isinstance(r.json().get("detail"), list):  # by the event's validator
        doc = r.json()
        said = "; ".join(v["message"] for v in doc["detail"] if v.get("is_valid") is False)
        return "error", [("refused", doc), ("error", said)]
    r.raise_for_status()
    event_id = r.json()["event_id"]
    events: list[tuple[str, Any]] = []
    name = ""
    with client.stream("GET", f"{base_url}/gradio_api/call/{api}/{event_id}", headers=headers or {}) as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                raw = line[5:].strip()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = raw
                events.append((name, payload))
                if name in ("complete", "error"):
                    return name, events
    return name, events


Minter = Callable[[str], str]
"""Makes a token for one call, given its purpose (as a frontend does per call)."""


def token_for(secret: str, identity: Identity, **kwargs: Any) -> Minter:
    tokens = IdentityTokens([secret], **kwargs)
    return lambda purpose: tokens.mint(identity, purpose)


def generate_call(**overrides: Any) -> Call:
    """A call of the built-in app's ``generate`` with these fields (the defaults for the rest)."""
    return Call("generate", gen_args(**overrides))


def generate_token(minter: Minter, **overrides: Any) -> str:
    """A token bound to the call of ``generate`` with these fields, as the frontend mints it."""
    return minter(call_purpose(generate_call(**overrides).digest()))


def generate_on_gpu_tier(base_url: str, token: str | Minter | None, **overrides: Any) -> tuple[str, Any]:
    """Call the built-in app's ``generate`` on the GPU tier's call route as a frontend does:
    ("complete", the CallResult's document: ``data`` [the image, its info], ``info`` the
    call's) or ("error", "Title: message").

    ``token``: a minter (a fresh token bound to this call, as the frontend sends), or a
    token as it is (garbage, a replay, one bound to another call)."""
    if callable(token):
        token = generate_token(token, **overrides)
    headers = {IDENTITY_HEADER: token, "content-type": frames.FRAME_TYPE} if token else {}
    body = frames.encode(generate_call(**overrides).to_wire())
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", base_url + CALL_PATH, content=body, headers=headers) as r:
            if r.status_code != 200:
                return "error", from_wire(json.loads(r.read())).user_text()
            splitter = frames.FrameSplitter()
            for chunk in r.iter_bytes():
                for frame in splitter.feed(chunk):
                    update = frames.decode(frame)
                    if update["status"] == "done":
                        return "complete", update
                    if update["status"] == "error":
                        return "error", from_wire(update).user_text()
    return "closed", None


def error_text(events: list[tuple[str, Any]]) -> str:
    for name, payload in events:
        if name == "error":
            return payload.get("error") if isinstance(payload, dict) else str(payload)
    return ""


def splitspace_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``splitspace ARGS`` as an operator runs it, configured by ``env`` alone (no other
    ``SPLITSPACE_*`` variable), in this process: typer's CliRunner, since a CLI process costs a
    second of CPU to start (``tests/test_dev.py`` runs the real command line). An exception the
    CLI lets out is in ``stderr`` as a process would print it."""
    from typer.testing import CliRunner

    from splitspace.deploy.cli import app

    unset: dict[str, str | None] = {name: None for name in os.environ if name.startswith("SPLITSPACE_")}
    result = CliRunner().invoke(app, list(args), env={**unset, **env})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["splitspace", *args], result.exit_code, result.stdout, stderr)
