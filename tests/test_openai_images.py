"""OpenAI's images API on the frontend, called with the official ``openai`` SDK through the real tiers.

The deployment is the session's ``direct`` one (``sleep:1``: each image is a flat PNG of
the requested size; the quota file of ``conftest.py``). The error mapping's table is
checked in-process, where the subject is logic.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from splitspace.cpu_frontend.api.openai_images import ModelNotFound, openai_error
from splitspace.shared.contract.errors import (
    QUEUE_FULL,
    QUOTA_EXCEEDED,
    BackendUnavailable,
    GpuFailed,
    ServiceUnavailable,
    Throttled,
    Unauthorized,
    ValidationFailed,
)
from tests.conftest import QUOTAS, key
from tests.support import Deployment, gpu_depth, wait_for


def client(d: Deployment, api_key: str = key("beta")) -> OpenAI:
    assert d.frontend is not None
    return OpenAI(base_url=f"{d.frontend.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def test_generate_returns_n_pngs_of_the_requested_size(direct: Deployment) -> None:
    result = client(direct).images.generate(
        prompt="a red fox",
        n=3,
        size="64x128",  # type: ignore[arg-type]
        extra_body={"seed": 7, "num_inference_steps": 1},
    )
    assert len(result.data) == 3
    images = [png(base64.b64decode(item.b64_json or "")) for item in result.data]
    assert [image.size for image in images] == [(64, 128)] * 3
    # seed + i for image i: three different flat colours (sleep:1 colours by seed)
    assert len({image.getpixel((0, 0)) for image in images}) == 3
    assert result.created > 0


def test_seed_minus_one_is_random_for_each_image(direct: Deployment) -> None:
    def second_image() -> bytes:
        result = client(direct).images.generate(
            prompt="random",
            n=2,
            size="64x64",  # type: ignore[arg-type]
            extra_body={"seed": -1},
        )
        return base64.b64decode(result.data[1].b64_json or "")

    # (seed + i would make the second image seed 0's every time)
    assert second_image() != second_image()


def test_ten_images_each_its_own_request(direct: Deployment) -> None:
    result = client(direct).images.generate(prompt="ten", n=10, size="64x64")  # type: ignore[arg-type]
    assert len(result.data) == 10
    assert all(png(base64.b64decode(item.b64_json or "")).size == (64, 64) for item in result.data)


def test_response_format_url_is_a_capability_url(direct: Deployment) -> None:
    from splitspace.cpu_frontend.core import IMAGE_NAME

    result = client(direct).images.generate(prompt="a url", size="64x64", response_format="url")  # type: ignore[arg-type]
    url = result.data[0].url
    assert url is not None and "/gradio_api/file=" in url
    assert url.endswith(f"/{IMAGE_NAME}"), "a file the sweep below deletes after SPLITSPACE_JOB_TTL_S"
    r = httpx.get(url, timeout=30)  # no credentials: whoever holds the URL may read it
    assert r.status_code == 200
    assert png(r.content).size == (64, 64)


def test_images_handed_out_by_url_expire_with_the_jobs_ttl(tmp_path: Path) -> None:
    """What a URL points at is deleted ``SPLITSPACE_JOB_TTL_S`` after it was written (in
    process: the sweep's rule; the lifespan runs it every minute)."""
    from splitspace.cpu_frontend.core import IMAGE_NAME, expire_images

    now = time.time()
    for name, age in (("old", 100.0), ("new", 10.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / IMAGE_NAME).write_bytes(b"PNG")
        os.utime(tmp_path / name / IMAGE_NAME, (now - age, now - age))
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload" / "other.png").write_bytes(b"PNG")  # not an image the frontend wrote
    os.utime(tmp_path / "upload" / "other.png", (now - 1000, now - 1000))
    assert expire_images(str(tmp_path), 60.0, now) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "upload"]
    assert expire_images(str(tmp_path), 60.0, now) == 0


def test_the_sweep_never_reaches_another_apps_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tier's Gradio cache is its own (the sweep above deletes every old ``image.png``
    in it): not Gradio's shared ``$TMPDIR/gradio``, unless the operator names one."""
    from gradio import utils as gr_utils

    from splitspace.shared.app.files import use_own_cache

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    shared_default = gr_utils.get_upload_folder()
    use_own_cache("frontend")
    assert gr_utils.get_upload_folder() != shared_default
    assert Path(gr_utils.get_upload_folder()).name == "splitspace-frontend"
    monkeypatch.setenv("GRADIO_TEMP_DIR", "/srv/cache")
    use_own_cache("frontend")
    assert gr_utils.get_upload_folder() == "/srv/cache"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"size": "13x13"}, "size"),
        ({"size": "garbage"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"prompt": "   "}, "prompt"),
        ({"model": "dall-e-3"}, "model"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"extra_body": {"steps": 1000}}, "steps"),
        ({"extra_body": {"guidance_scale": "lots"}}, "guidance_scale"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(direct: Deployment, fields: dict, param: str) -> None:
    call = {"prompt": "a red fox", "size": "64x64", **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client(direct).images.generate(**call)
    err = caught.value
    assert err.status_code == 400
    assert err.param == param, err.body
    assert err.type == "invalid_request_error"
    assert param in err.message


def test_missing_prompt_is_400(direct: Deployment) -> None:
    assert direct.frontend is not None
    r = httpx.post(f"{direct.frontend.url}/v1/images/generations", json={"n": 1}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"a red fox", "application/json", 400, "invalid_json"),  # the route's pydantic reads it
        (b'{"prompt": "a red fox"', "application/json", 400, "invalid_json"),  # the guard's JSON limits
        (json.dumps({"prompt": "x" * 20_000}).encode(), "application/json", 413, "request_too_large"),
        (b"prompt=a+red+fox", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
def test_bodies_refused_before_the_route_are_in_openai_shape(
    direct: Deployment, body: bytes, content_type: str, status: int, code: str
) -> None:
    """Not JSON, over the size limit, a form: refused by the frontend's guard or the route,
    always as OpenAI's ``{"error": {...}}`` (the SDK reads its message from there)."""
    assert direct.frontend is not None
    url = f"{direct.frontend.url}/v1/images/generations"
    r = httpx.post(url, content=body, headers={"content-type": content_type}, timeout=30)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] is None
    if status == 413:
        assert "at most 16384 bytes" in r.json()["error"]["message"]  # the limit, named


def test_an_oversized_prompt_through_the_sdk_is_its_413_with_openais_message(direct: Deployment) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client(direct).images.generate(prompt="x" * 20_000, size="64x64")  # type: ignore[arg-type]
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large" and "at most 16384 bytes" in caught.value.message


def test_unknown_fields_are_ignored_and_openai_fields_accepted(direct: Deployment) -> None:
    result = client(direct).images.generate(
        prompt="a fox",
        size="64x64",
        quality="hd",
        style="vivid",  # type: ignore[arg-type]
        user="someone",
        extra_body={"not_a_field": 1},
    )
    assert len(result.data) == 1


def test_the_served_model_is_listed_and_accepted(direct: Deployment) -> None:
    c = client(direct)
    models = c.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["sleep:1"]
    assert models.data[0].owned_by == "splitspace"
    assert c.models.retrieve("sleep:1").id == "sleep:1"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("dall-e-3")
    assert len(c.images.generate(prompt="named", model="sleep:1", size="64x64").data) == 1  # type: ignore[arg-type]


def test_an_unknown_key_is_401(direct: Deployment) -> None:
    c = client(direct, api_key="no-such-key")
    with pytest.raises(openai.AuthenticationError) as caught:
        c.images.generate(prompt="a fox", size="64x64")  # type: ignore[arg-type]
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_n_images_count_against_the_cap_like_n_calls(direct: Deployment) -> None:
    c = client(direct, api_key=key("tight"))  # max_running 1 + max_queued 1
    assert len(c.images.generate(prompt="two fit", n=2, size="64x64").data) == 2  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as caught:
        c.images.generate(prompt="three do not", n=3, size="64x64")  # type: ignore[arg-type]
    err = caught.value
    assert err.status_code == 429
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.code == "queue_full"
    # a bad body is checked before any place is taken: its 400, not the cap's 429
    with pytest.raises(openai.BadRequestError) as bad:
        c.images.generate(prompt="three, too small", n=3, size="8x8")  # type: ignore[arg-type]
    assert bad.value.param == "size", bad.value.body
    # all or none: the refused call gave its places back, so the client's next call runs
    assert len(c.images.generate(prompt="again", n=2, size="64x64").data) == 2  # type: ignore[arg-type]


def test_a_caller_who_leaves_gives_its_places_back_and_the_gpu_tier_drops_its_jobs(tmp_path: Path) -> None:
    """``sleep:5000``: two images of one client, one running on the GPU and one queued there
    (``max_running`` 1); the caller gives up after a second. Its places at the door are free
    and the queued job is gone long before the running one could have finished."""
    d = Deployment(tmp_path, model="sleep:5000", quotas=QUOTAS).start()
    try:
        assert d.frontend is not None and d.backend is not None
        c = OpenAI(base_url=f"{d.frontend.url}/v1", api_key=key("beta"), max_retries=0, timeout=1.0)
        with pytest.raises(openai.APITimeoutError):
            c.images.generate(prompt="leave", n=2, size="64x64")  # type: ignore[arg-type]
        left = time.monotonic()
        door = lambda: httpx.get(f"{d.frontend.url}/health", timeout=5).json()["door"]  # type: ignore[union-attr]  # noqa: E731
        assert wait_for(lambda: door()["inside"] == 0 and door()["waiting"] == 0, 10), door()
        assert wait_for(lambda: gpu_depth(d.backend.url)[0] == 0, 10), gpu_depth(d.backend.url)  # type: ignore[union-attr]
        assert time.monotonic() - left < 3.0, "freed only when the jobs had finished, not when the caller left"
    finally:
        d.stop()


def test_no_gpu_tier_is_503(tmp_path: Path) -> None:
    d = Deployment(tmp_path, model="sleep:1", quotas=QUOTAS)
    d.workdir.mkdir(parents=True, exist_ok=True)
    d.write_quotas(QUOTAS)
    d.start_frontend()  # its GPU tier's port has nobody listening
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            client(d).images.generate(prompt="nobody home", size="64x64")  # type: ignore[arg-type]
        assert caught.value.status_code == 503
        assert caught.value.code == "backend_unavailable"
        assert client(d).models.list().data[0].id == "tiny"  # no GPU tier has answered: the configured model
    finally:
        d.stop()


def _mapped(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    response = openai_error(exc)
    return response.status_code, json.loads(bytes(response.body))["error"], dict(response.headers)


@pytest.mark.parametrize(
    ("exc", "status", "kind", "param", "code"),
    [
        (ValidationFailed("width", "must be a multiple of 8"), 400, "invalid_request_error", "size", "invalid_value"),
        (ValidationFailed("seed", "must be -1"), 400, "invalid_request_error", "seed", "invalid_value"),
        (ModelNotFound("dall-e-3"), 404, "invalid_request_error", "model", "model_not_found"),
        (Unauthorized("unknown API key"), 401, "invalid_request_error", None, "invalid_api_key"),
        (Throttled(QUEUE_FULL, "2 in flight", 1.0), 429, "requests", None, "queue_full"),
        (Throttled(QUOTA_EXCEEDED, "used up", 3000), 429, "insufficient_quota", None, "insufficient_quota"),
        (ServiceUnavailable("redis down", 2.0), 503, "server_error", None, "service_unavailable"),
        (BackendUnavailable("no GPU tier"), 503, "server_error", None, "backend_unavailable"),
        (GpuFailed("RuntimeError"), 502, "server_error", None, "gpu_error"),
        (RuntimeError("a bug"), 500, "server_error", None, None),
    ],
)
def test_each_error_maps_to_openai_shape(
    exc: BaseException, status: int, kind: str, param: str | None, code: str | None
) -> None:
    got_status, error, headers = _mapped(exc)
    assert (got_status, error["type"], error["param"], error["code"]) == (status, kind, param, code)
    assert error["message"]
    if isinstance(exc, (Throttled, ServiceUnavailable)):
        assert headers["retry-after"] == str(exc.retry_after_whole_s)
        # the SDK would retry at once after a wait longer than a minute: told not to
        assert (headers.get("x-should-retry") == "false") == (exc.retry_after_whole_s > 60)
    if isinstance(exc, RuntimeError):
        assert "a bug" not in error["message"]  # nothing of the server's internals
