"""A developer's own Gradio app through both tiers (``SPLITSPACE_APP``), as processes.

The frontend serves the app's Blocks; each ``@splitspace.gpu`` event crosses the hop to
the GPU tier, which runs it behind the same identity checks, limits and fair queue as
the built-in model. The apps: ``examples/shout.py``, ``examples/mirror.py`` (jobs with a
picture) and ``tests/apps/studio.py`` (an image function, several outputs, a batch
function, functions that hold the GPU or fail, and a function without the decorator).
Jobs (``/v1/jobs``) of the apps' functions go through the same tiers.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from splitspace.session.identity import Identity
from splitspace.session.token import IdentityTokens, call_purpose
from splitspace.shared.contract import frames
from splitspace.shared.contract.calls import CALL_PATH, Call, CarriedFile, base64_body_limit
from splitspace.shared.contract.headers import IDENTITY_HEADER
from tests.clients import call_rest, error_text
from tests.job_support import wait_job
from tests.support import OPEN_ANONYMOUS, TIER, Deployment, app_deployment, keys_toml, tiers_toml, wait_for

STUDIO = "tests/apps/studio.py"
KEYS = {
    "heavy": "burst",
    "light": "light",
    "tight": "tight",
    "chatty": "chatty",
    "chatty-other": "light",
    "holder": "light",
    "batch-a": "light",
    "batch-b": "light",
    "tight-other": "light",
    "tight-rest": "tight",
    "jobs": "light",
}
QUOTAS = tiers_toml(
    anonymous=OPEN_ANONYMOUS,
    burst={**TIER, "max_queued": 30},
    light=TIER,
    tight={**TIER, "max_queued": 1},
    chatty={**TIER, "max_queued": 10, "requests_per_minute": 2},
) + keys_toml(KEYS, lambda name: f"app-{name}-key")


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer app-{name}-key"}


def deployment(workdir: Path, app: str, gpu_env: dict[str, str] | None = None) -> Deployment:
    jobs = {"SPLITSPACE_JOBS_PATH": str(workdir / "jobs.sqlite3")}
    return app_deployment(workdir, app, QUOTAS, env=jobs, gpu_env=gpu_env)


@pytest.fixture(scope="module")
def shout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = deployment(tmp_path_factory.mktemp("shout"), "examples/shout.py").start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The GPU tier's cache in the work folder, its files kept 5 s after their last use."""
    work = tmp_path_factory.mktemp("mirror")
    gpu_env = {"GRADIO_TEMP_DIR": str(work / "gpu-cache"), "SPLITSPACE_GPU_FILES_TTL_S": "5"}
    d = deployment(work, "examples/mirror.py", gpu_env).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = deployment(tmp_path_factory.mktemp("studio"), STUDIO).start()
    yield d
    d.stop()


def function_calls(d: Deployment) -> dict[str, float]:
    """The GPU tier's count of calls that reached it, by function."""
    assert d.backend is not None
    text = httpx.get(f"{d.backend.url}/metrics", timeout=10).text
    return {
        m[0]: float(m[1])
        for m in re.findall(r'^splitspace_function_calls_total\{endpoint="([^"]+)"\} (\S+)$', text, re.M)
    }


def health(d: Deployment) -> dict[str, Any]:
    assert d.backend is not None
    return httpx.get(f"{d.backend.url}/health", timeout=10).json()


def rest(d: Deployment, api: str, data: list[Any], who: str | None = None) -> tuple[str, Any]:
    """A REST call (the curl flow) through the frontend: ("complete", outputs) or ("error", text)."""
    assert d.frontend is not None
    with httpx.Client(timeout=120) as c:
        final, events = call_rest(c, d.frontend.url, api, data, bearer(who) if who else None)
    if final == "complete":
        return final, events[-1][1]
    return final, error_text(events)


def predict(d: Deployment, *args: Any, api_name: str) -> Any:
    """One call through the frontend with gradio_client, as a developer's users would."""
    assert d.frontend is not None
    client = Client(d.frontend.url, verbose=False)
    try:
        return client.predict(*args, api_name=api_name)
    finally:
        client.close()


def in_background(call: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


# -- the smallest app ----------------------------------------------------------------------
def test_gradio_client_calls_the_decorated_function_on_the_gpu_tier(shout: Deployment) -> None:
    before = function_calls(shout).get("shout", 0.0)
    assert predict(shout, "hi", 3, api_name="/shout") == "HI HI HI"
    assert function_calls(shout)["shout"] == before + 1
    assert health(shout)["functions"] == ["shout"]


# -- what crosses the hop ------------------------------------------------------------------
def test_an_image_crosses_both_ways_with_its_pixels_intact(studio: Deployment, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    out = predict(studio, handle_file(str(tmp_path / "in.png")), api_name="/mirror")
    got = np.asarray(Image.open(out).convert("RGB"))
    assert got.shape == pixels.shape and (got == pixels[:, ::-1]).all()


def test_several_outputs_arrive_each_in_its_component(studio: Deployment) -> None:
    assert predict(studio, "hello", api_name="/stats") == ("HELLO", 5)


def test_a_function_without_the_decorator_never_reaches_the_gpu_tier(studio: Deployment) -> None:
    before = function_calls(studio)
    assert predict(studio, "one two three", api_name="/count") == 3
    assert predict(studio, "a", api_name="/stats") == ("A", 1)  # the counter does move for a GPU call
    after = function_calls(studio)
    assert "count" not in after
    assert after.get("stats", 0) == before.get("stats", 0) + 1
    assert sum(after.values()) == sum(before.values()) + 1


def test_a_functions_errors_pass_on_its_message_or_only_the_exception_type(studio: Deployment) -> None:
    final, text = rest(studio, "fussy", ["bad"])
    assert final == "error" and "no bad words here" in text, text
    final, text = rest(studio, "fussy", ["boom"])
    assert (final, text) == ("error", "GPU error: the function failed (ValueError)")  # no path, no message
    assert rest(studio, "fussy", ["fine"]) == ("complete", ["fine"])


# -- the GPU tier trusts nothing -----------------------------------------------------------
def test_the_gpu_tier_refuses_a_call_unsigned_or_signed_with_another_secret(studio: Deployment) -> None:
    assert studio.backend is not None
    call = Call("stats", ["x"])
    url = studio.backend.url + CALL_PATH
    unsigned = httpx.post(url, json=call.to_wire(), timeout=10)
    forged_token = IdentityTokens(["not-the-secret"]).mint(
        Identity("key:x", "key", "free", "1.2.3.4"), call_purpose(call.digest())
    )
    forged = httpx.post(url, json=call.to_wire(), headers={IDENTITY_HEADER: forged_token}, timeout=10)
    other_call = IdentityTokens([studio.secret]).mint(
        Identity("key:x", "key", "free", "1.2.3.4"), call_purpose(Call("stats", ["y"]).digest())
    )
    rebound = httpx.post(url, json=call.to_wire(), headers={IDENTITY_HEADER: other_call}, timeout=10)
    assert [r.status_code for r in (unsigned, forged, rebound)] == [401, 401, 401]
    assert {r.json()["title"] for r in (unsigned, forged, rebound)} == {"Unauthorized"}


def test_the_gpu_tier_names_an_unknown_function_and_an_unreadable_input(studio: Deployment) -> None:
    assert studio.backend is not None
    tokens = IdentityTokens([studio.secret])
    me = Identity("key:x", "key", "free", "1.2.3.4")

    def post(call: Call) -> httpx.Response:
        headers = {IDENTITY_HEADER: tokens.mint(me, call_purpose(call.digest()))}
        return httpx.post(studio.backend.url + CALL_PATH, json=call.to_wire(), headers=headers, timeout=10)

    unknown = post(Call("count", ["a b"]))  # the frontend's own function is not served here
    assert unknown.status_code == 404 and "count" in unknown.json()["message"], unknown.text
    too_many = post(Call("stats", ["a", "b"]))
    assert too_many.status_code == 422 and too_many.json()["field"] == "data", too_many.text
    a_path = post(Call("mirror", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}]))
    assert a_path.status_code == 422 and a_path.json()["field"] == "Picture", a_path.text


def test_the_gpu_tier_takes_a_calls_file_as_bytes_after_its_json_and_checks_them(studio: Deployment) -> None:
    """A call is a frame (``shared/contract/frames.py``): the file's bytes follow the JSON line,
    bound to the token by their sha256; bytes swapped after signing are refused."""
    assert studio.backend is not None
    buf = io.BytesIO()
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(pixels).save(buf, format="PNG")
    call = Call("mirror", [CarriedFile("in.png", "image/png", buf.getvalue())])
    me = Identity("key:x", "key", "free", "1.2.3.4")

    def headers() -> dict[str, str]:  # a token is good for one call
        token = IdentityTokens([studio.secret]).mint(me, call_purpose(call.digest()))
        return {IDENTITY_HEADER: token, "content-type": frames.FRAME_TYPE}

    body, url = frames.encode(call.to_wire()), studio.backend.url + CALL_PATH
    with httpx.stream("POST", url, content=body, headers=headers(), timeout=10) as r:
        splitter = frames.FrameSplitter()
        docs = [frames.decode(f) for chunk in r.iter_bytes() for f in splitter.feed(chunk)]
    assert r.status_code == 200 and docs[-1]["status"] == "done", docs
    mirrored = docs[-1]["data"][0]
    assert isinstance(mirrored, CarriedFile) and mirrored.name.endswith(".png")
    got = np.asarray(Image.open(io.BytesIO(mirrored.data)).convert("RGB"))
    assert (got == pixels[:, ::-1]).all()
    swapped = body[:-1] + bytes([body[-1] ^ 1])
    refused = httpx.post(url, content=swapped, headers=headers(), timeout=10)
    assert refused.status_code == 422 and "sha256" in refused.json()["message"], refused.text


# -- limits and fairness, as for the built-in ------------------------------------------------
def test_a_clients_calls_are_rate_limited_and_another_clients_are_not(studio: Deployment) -> None:
    outcomes = [rest(studio, "nap", [1], "chatty") for _ in range(3)]
    assert [o[0] for o in outcomes[:2]] == ["complete", "complete"], outcomes
    assert outcomes[2][0] == "error" and outcomes[2][1].startswith("Rate limited"), outcomes
    assert rest(studio, "nap", [1], "chatty-other") == ("complete", ["rested"])


def test_a_client_over_its_queue_is_refused_and_another_is_served(studio: Deployment, tmp_path: Path) -> None:
    release = tmp_path / "release"
    held = [in_background(lambda: rest(studio, "hold", [str(release)], "tight")) for _ in range(2)]
    try:
        assert wait_for(lambda: health(studio)["running"] + health(studio)["queued"] >= 2, 60), health(studio)
        final, text = rest(studio, "nap", [1], "tight")
        assert final == "error" and text.startswith("Queue full"), text
    finally:
        release.touch()
    for thread, out in held:
        thread.join(60)
        assert out == [("complete", ["released"])]
    assert rest(studio, "nap", [1], "tight-other") == ("complete", ["rested"])


def test_a_rest_call_over_the_cap_is_a_429_at_the_post(studio: Deployment, tmp_path: Path) -> None:
    """The door's middleware holds an app's GPU events' REST calls before Gradio, as the
    built-in's: over its client's cap (one running, one waiting), ``POST /call/<api>`` is
    refused at once with 429 and Retry-After, and nothing is queued."""
    assert studio.frontend is not None
    release = tmp_path / "release"
    held = [in_background(lambda: rest(studio, "hold", [str(release)], "tight-rest")) for _ in range(2)]
    try:
        assert wait_for(lambda: health(studio)["running"] + health(studio)["queued"] >= 2, 60), health(studio)
        over = httpx.post(
            f"{studio.frontend.url}/gradio_api/call/nap", json={"data": [1]}, headers=bearer("tight-rest"), timeout=30
        )
        assert over.status_code == 429, over.text
        assert over.json()["title"] == "Queue full" and int(over.headers["retry-after"]) >= 1, over.text
        assert "event_id" not in over.json()
    finally:
        release.touch()
    for thread, out in held:
        thread.join(60)
        assert out == [("complete", ["released"])]
    assert rest(studio, "nap", [1], "tight-rest") == ("complete", ["rested"]), "its place is free again"


def test_a_burst_from_one_client_does_not_delay_another(studio: Deployment, tmp_path: Path) -> None:
    """While the GPU is held, twelve naps of 300 ms queue from one key, then one from
    another: when the GPU is free, fair queueing serves the second at its next turn,
    first in first out would serve it after the whole burst."""
    done: dict[str, list[float]] = {"heavy": [], "light": []}
    lock = threading.Lock()
    release = tmp_path / "release"

    def call(who: str) -> None:
        assert rest(studio, "nap", [300], who) == ("complete", ["rested"])
        with lock:
            done[who].append(time.monotonic())

    holder, held = in_background(lambda: rest(studio, "hold", [str(release)], "holder"))
    try:
        assert wait_for(lambda: health(studio)["running"] == 1, 60), health(studio)
        with ThreadPoolExecutor(13) as pool:
            heavy = [pool.submit(call, "heavy") for _ in range(12)]
            assert wait_for(lambda: health(studio)["queued"] == 12, 60), health(studio)
            light = pool.submit(call, "light")
            assert wait_for(lambda: health(studio)["queued"] == 13, 60), health(studio)
            release.touch()
            for f in [*heavy, light]:
                f.result(timeout=120)
    finally:
        release.touch()
        holder.join(60)
    assert held == [("complete", ["released"])]
    heavy_after = sum(t > done["light"][0] for t in done["heavy"])
    assert heavy_after >= 6, (sorted(done["heavy"]), done["light"])


def test_a_batch_function_runs_two_clients_calls_in_one_call(studio: Deployment, tmp_path: Path) -> None:
    release = tmp_path / "release"
    holder, held = in_background(lambda: rest(studio, "hold", [str(release)], "holder"))
    try:
        assert wait_for(lambda: health(studio)["running"] == 1, 60), health(studio)
        calls = [
            in_background(lambda x=x, who=who: rest(studio, "double", [x], who))
            for x, who in ((2, "batch-a"), (5, "batch-b"))
        ]
        assert wait_for(lambda: health(studio)["queued"] == 2, 60), health(studio)
    finally:
        release.touch()
    holder.join(60)
    assert held == [("complete", ["released"])]
    for thread, _ in calls:
        thread.join(60)
    assert [out for _, out in calls] == [[("complete", [4, 2])], [("complete", [10, 2])]]


# -- jobs (/v1/jobs) of the app's functions ------------------------------------------------------
def post_job(d: Deployment, body: dict[str, Any]) -> httpx.Response:
    assert d.frontend is not None
    return httpx.post(f"{d.frontend.url}/v1/jobs", json=body, headers=bearer("jobs"), timeout=30)


def finished_job(d: Deployment, body: dict[str, Any]) -> dict[str, Any]:
    assert d.frontend is not None
    r = post_job(d, body)
    assert r.status_code == 202, r.text
    return wait_job(d.frontend.url, r.json()["id"], bearer("jobs"))


def test_a_job_runs_a_decorated_function_and_a_bad_input_is_refused_as_by_gradio(shout: Deployment) -> None:
    job = finished_job(shout, {"endpoint": "/shout", "inputs": {"text": "hey", "times": 3}})
    assert (job["status"], job["outputs"]) == ("succeeded", ["HEY HEY HEY"]), job
    assert finished_job(shout, {"endpoint": "/shout", "data": ["ho"]})["outputs"] == ["HO HO"]  # the default
    for inputs, field, message in (
        ({"text": "hey", "times": 9}, "times", "Times: must be at most 5"),
        ({"text": "x" * 201}, "text", "Text: at most 200 characters"),
        ({"text": "hey", "times": 2.5}, "times", "Times: must be in steps of 1 from 1"),
        ({"text": "hey", "loud": True}, "loud", "is not an input of this endpoint (its inputs: text, times)"),
    ):
        r = post_job(shout, {"endpoint": "/shout", "inputs": inputs})
        assert r.status_code == 400 and (r.json()["field"], r.json()["message"]) == (field, message), r.text
    # the Gradio API path refuses the same input, named and said the same way
    assert shout.frontend is not None
    r = httpx.post(f"{shout.frontend.url}/gradio_api/call/shout", json={"data": ["hey", 9]}, headers=bearer("jobs"))
    refused = [v for v in r.json()["detail"] if not v["is_valid"]]
    assert r.status_code == 422 and refused == [
        {"__type__": "validate", "is_valid": False, "message": "Times: must be at most 5", "parameter_name": "times"}
    ]
    # a direct call (Gradio runs no validator for it): refused by the frontend's handler, named the same way
    r = httpx.post(f"{shout.frontend.url}/gradio_api/run/shout", json={"data": ["hey", 9]}, headers=bearer("jobs"))
    assert 400 <= r.status_code < 500 and "Times: must be at most 5" in r.text, r.text


def test_a_job_takes_a_picture_as_base64_and_answers_with_its_mirror_image(mirror: Deployment) -> None:
    """``examples/mirror.py``: a PNG (over the guard's default 16 KiB as base64) in, its mirror
    image out (as a lossy WebP, ``gr.Image(type="pil")``'s format: compared within a margin)."""
    pixels = np.full((120, 160, 3), 20, dtype=np.int16)
    pixels[:60, :50], pixels[60:, 50:] = 220, 120  # unlike itself flipped either way
    pixels += np.random.default_rng(3).integers(-8, 9, pixels.shape, dtype=np.int16)  # (size)
    pixels = pixels.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert len(b64) > 16 * 1024  # over the guard's default body limit: /v1/jobs takes files' bodies
    for given, upside_down in (({"b64": b64, "name": "in.png"}, False), (f"data:image/png;base64,{b64}", True)):
        job = finished_job(mirror, {"endpoint": "/mirror", "inputs": {"picture": given, "upside_down": upside_down}})
        assert job["status"] == "succeeded", job
        (out,) = job["outputs"]
        image = httpx.get(out["url"], headers=bearer("jobs"), timeout=30)
        assert image.status_code == 200 and out["mime_type"] == "image/webp"
        got = np.asarray(Image.open(io.BytesIO(image.content)).convert("RGB")).astype(np.int16)
        want = (pixels[::-1] if upside_down else pixels[:, ::-1]).astype(np.int16)
        assert got.shape == want.shape and np.abs(got - want).mean() < 10
        assert np.abs(got - pixels.astype(np.int16)).mean() > 40  # (not the picture as it was)
    # a file that is not a picture, as the component's file types say
    text = {"b64": base64.b64encode(b"hello").decode(), "name": "notes.txt"}
    r = post_job(mirror, {"endpoint": "/mirror", "inputs": {"picture": text}})
    assert r.status_code == 400 and r.json()["field"] == "picture", r.text
    assert r.json()["message"] == "Picture: notes.txt is not one of the accepted file types (image)"


def test_the_gpu_tier_deletes_a_calls_files_once_they_are_old(mirror: Deployment, tmp_path: Path) -> None:
    """It serves no file to anyone (each crosses the hop as bytes): the picture a call brought
    and the one it made are gone from its cache SPLITSPACE_GPU_FILES_TTL_S after, not kept forever."""
    cache = mirror.workdir / "gpu-cache"
    Image.new("RGB", (40, 30), "red").save(tmp_path / "in.png")
    before = time.time()
    out = predict(mirror, handle_file(str(tmp_path / "in.png")), False, api_name="/mirror")
    assert Image.open(out).size == (40, 30)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and time.time() - before < 5, "the call's files were in the GPU tier's cache"
    assert wait_for(lambda: not any(p.is_file() for p in cache.rglob("*")), 30), "and are gone after 5 s"


def test_a_function_without_the_decorator_has_no_job(studio: Deployment) -> None:
    """It runs on the frontend, in Gradio alone (as the Gradio API calls it): a job for it is refused."""
    r = post_job(studio, {"endpoint": "/count", "inputs": {"text": "one two"}})
    assert r.status_code == 400 and r.json()["field"] == "endpoint" and "no endpoint '/count'" in r.text, r.text


def test_a_job_body_over_the_file_limit_is_a_413_naming_it(mirror: Deployment) -> None:
    assert mirror.frontend is not None
    limit = base64_body_limit(50 * 1024 * 1024)  # SPLITSPACE_MAX_FILE_BYTES's default, as base64, and the call
    host, port = mirror.frontend.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # the headers alone: refused before the body
        s.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert f"at most {limit} bytes" in body.decode(), body
