"""The built-in text-to-image as an app on the developer API (``builtin/text_to_image_app.py``),
served through both tiers as ``SPLITSPACE_APP``, as processes, called with real clients.

Its ``/generate`` takes and answers what the built-in always did (the image; its info with
the seed, size, steps, guidance, model, timings and whose call it was), its ``/quota`` is
the caller's standing, a batch across clients gives each call its own seed, and a live
model change (the operators' ``PUT /admin/model``) is one for the app.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from typing import Any

import httpx
import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from splitspace.builtin import APP, is_builtin
from tests.clients import call_rest, gen_args
from tests.conftest import QUOTAS, key
from tests.support import Deployment, app_deployment, in_threads, wait_for

INFO_KEYS = ["seed", "width", "height", "steps", "guidance_scale", "model", "queue_s", "gpu_s", "total_s", "client"]
BATCH_KEYS = ("alpha", "beta", "other", "chatty")


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    batching = {"SPLITSPACE_MAX_BATCH": "4", "SPLITSPACE_BATCH_WAIT_MS": "300"}
    d = app_deployment(tmp_path_factory.mktemp("builtin"), APP, QUOTAS, env=batching).start()
    yield d
    d.stop()


def predict(d: Deployment, *args: Any, api_name: str, api_key: str | None = None) -> Any:
    assert d.frontend is not None
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    client = Client(d.frontend.url, verbose=False, headers=headers)
    try:
        return client.predict(*args, api_name=api_name)
    finally:
        client.close()


def set_model(d: Deployment, spec: str) -> None:
    assert d.backend is not None
    r = httpx.put(
        f"{d.backend.url}/admin/model",
        json={"model": spec},
        headers={"authorization": f"Bearer {d.admin_token}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text


def test_the_app_file_is_the_builtin_whatever_way_it_is_named() -> None:
    assert is_builtin(APP) and is_builtin(f"{APP}:demo")
    assert not is_builtin(f"{APP}:other") and not is_builtin("examples/shout.py") and not is_builtin(None)


def test_gradio_client_gets_the_image_and_its_info_as_ever(builtin: Deployment) -> None:
    path, info = predict(builtin, *gen_args(width=128, height=64, seed=7), api_name="/generate", api_key=key("alpha"))
    assert Image.open(path).size == (128, 64)
    assert list(info) == INFO_KEYS
    assert info["seed"] == 7 and info["model"] == "tiny" and info["steps"] == 1 and info["guidance_scale"] == 0.0
    assert info["client"] == "key:alpha"
    assert info["gpu_s"] > 0 and info["total_s"] >= info["gpu_s"] and info["queue_s"] >= 0


def test_same_seed_same_pixels_and_a_random_seed_is_reported(builtin: Deployment) -> None:
    a, _ = predict(builtin, *gen_args(seed=42), api_name="/generate")
    b, _ = predict(builtin, *gen_args(seed=42), api_name="/generate")
    c, info = predict(builtin, *gen_args(seed=-1), api_name="/generate")
    pa, pb, pc = (np.asarray(Image.open(p)) for p in (a, b, c))
    assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)
    assert 0 <= info["seed"] <= 2**32 - 1


def test_unset_steps_and_guidance_take_the_models_preset(builtin: Deployment) -> None:
    assert builtin.frontend is not None
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, builtin.frontend.url, "generate", gen_args(steps=None, guidance_scale=None))
    assert final == "complete", events
    info = events[-1][1][1]
    assert (info["steps"], info["guidance_scale"]) == (2, 0.0)  # tiny's preset


def test_the_curl_flow_gets_a_decodable_png(builtin: Deployment) -> None:
    assert builtin.frontend is not None
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, builtin.frontend.url, "generate", gen_args(width=96, height=64, seed=3))
        assert final == "complete", events
        image, info = events[-1][1]
        assert info["width"] == 96 and info["seed"] == 3
        r = c.get(image["url"])
        r.raise_for_status()
    assert Image.open(BytesIO(r.content)).size == (96, 64)


def test_a_bad_field_is_refused_on_the_frontend_naming_it(builtin: Deployment) -> None:
    assert builtin.frontend is not None
    url = f"{builtin.frontend.url}/gradio_api/call/generate"
    for args, named, said in (
        (gen_args(width=100), "Width", "in steps of 8"),
        (gen_args(prompt="   "), "Prompt", "after stripping"),
        (gen_args(seed=2**40), "Seed", "-1 (random)"),
    ):
        r = httpx.post(url, json={"data": args}, timeout=30)
        assert r.status_code == 422 and named in r.text and said in r.text, r.text


def test_quota_is_the_callers_standing(builtin: Deployment) -> None:
    predict(builtin, *gen_args(), api_name="/generate", api_key=key("beta"))
    standing = predict(builtin, api_name="/quota", api_key=key("beta"))
    assert standing["tier"] == "pro" and standing["client"] == "key:beta"
    for k in ("limits", "used", "remaining", "resets_in_s", "queued", "running"):
        assert k in standing


def test_a_batch_across_clients_gives_each_its_own_seed_on_the_model_changed_live(builtin: Deployment) -> None:
    """``sleep:MS`` holds MS once per batch and paints each image from its seed: four
    clients' calls waiting together run as one batch, each charged a share of it."""
    assert builtin.backend is not None
    set_model(builtin, "sleep:600")
    try:
        assert wait_for(lambda: httpx.get(f"{builtin.backend.url}/health").json().get("model") == "sleep:600", 10)

        assert builtin.frontend is not None
        clients = [  # ready before the race: each call then arrives at once
            Client(builtin.frontend.url, verbose=False, headers={"authorization": f"Bearer {key(name)}"})
            for name in BATCH_KEYS
        ]
        results = in_threads(len(clients), lambda i: clients[i].predict(*gen_args(seed=100 + i), api_name="/generate"))
        for client in clients:
            client.close()
    finally:
        set_model(builtin, "tiny")
    infos = [info for _, info in results]
    assert [info["seed"] for info in infos] == [100, 101, 102, 103]
    assert {info["model"] for info in infos} == {"sleep:600"}
    assert {info["client"] for info in infos} == {f"key:{name}" for name in BATCH_KEYS}
    pixels = [np.asarray(Image.open(path)) for path, _ in results]
    assert len({p.tobytes() for p in pixels}) == 4  # one image per seed, none another's
    # at least two shared one batch: each was charged a share of the 0.6 s it held
    assert sum(info["gpu_s"] < 0.45 for info in infos) >= 2, infos
