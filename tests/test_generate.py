"""/generate through both tiers with the tiny model: gradio_client and the curl flow."""

from __future__ import annotations

import httpx
import numpy as np
from gradio_client import Client
from PIL import Image

from tests.clients import call_rest, gen_args

INFO_KEYS = {"seed", "width", "height", "steps", "model", "queue_s", "gpu_s", "total_s"}


def test_gradio_client_generates_image_of_requested_size(tiny):
    client = Client(tiny.frontend.url, verbose=False)
    path, info = client.predict(*gen_args(width=128, height=64, seed=7), api_name="/generate")
    img = Image.open(path)
    assert img.size == (128, 64)
    assert INFO_KEYS <= set(info)
    assert info["seed"] == 7 and info["model"] == "tiny"
    assert info["width"] == 128 and info["height"] == 64


def test_same_seed_same_pixels_different_seed_different(tiny):
    client = Client(tiny.frontend.url, verbose=False)
    a, _ = client.predict(*gen_args(seed=42), api_name="/generate")
    b, _ = client.predict(*gen_args(seed=42), api_name="/generate")
    c, _ = client.predict(*gen_args(seed=43), api_name="/generate")
    pa, pb, pc = (np.asarray(Image.open(p)) for p in (a, b, c))
    assert np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)


def test_random_seed_is_reported(tiny):
    client = Client(tiny.frontend.url, verbose=False)
    _, info = client.predict(*gen_args(seed=-1), api_name="/generate")
    assert 0 <= info["seed"] <= 2**32 - 1


def test_curl_flow_returns_decodable_image_and_info(tiny):
    with httpx.Client(timeout=60) as c:
        final, events = call_rest(c, tiny.frontend.url, "generate", gen_args(width=96, height=64, seed=3))
        assert final == "complete", events
        image, info = events[-1][1]
        assert info["width"] == 96 and info["seed"] == 3
        r = c.get(image["url"])
        r.raise_for_status()
        from io import BytesIO

        assert Image.open(BytesIO(r.content)).size == (96, 64)


def test_quota_endpoint_reports_standing(tiny):
    client = Client(tiny.frontend.url, verbose=False)
    client.predict(*gen_args(), api_name="/generate")
    q = client.predict(api_name="/quota")
    for k in ("tier", "limits", "used", "remaining", "resets_in_s", "queued", "running"):
        assert k in q
    assert q["tier"] == "anonymous"
    assert q["used"] > 0


def test_api_lists_generate_and_quota(tiny):
    info = httpx.get(f"{tiny.frontend.url}/gradio_api/info").json()
    assert "/generate" in info["named_endpoints"]
    assert "/quota" in info["named_endpoints"]
    params = [p["parameter_name"] for p in info["named_endpoints"]["/generate"]["parameters"]]
    assert params == ["prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed"]
