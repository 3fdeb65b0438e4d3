"""Every validation rule is refused on the CPU tier, naming the field; the GPU tier never sees it."""

from __future__ import annotations

import httpx
import pytest

from tests.clients import gen_args


def _calls(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("splitspace_calls_total"):
            return float(line.split()[-1])
    raise AssertionError("no call counter in /metrics")


CASES = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"negative_prompt": "x" * 1001}, "negative_prompt"),
    ({"width": 63}, "width"),
    ({"width": 100}, "width"),
    ({"width": 1032}, "width"),
    ({"height": 56}, "height"),
    ({"height": 2048}, "height"),
    ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"guidance_scale": -0.5}, "guidance_scale"),
    ({"guidance_scale": 20.5}, "guidance_scale"),
    ({"seed": -2}, "seed"),
    ({"seed": 2**32}, "seed"),
]


LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "width": "Width",
    "height": "Height",
    "steps": "Steps",
    "guidance_scale": "Guidance scale",
    "seed": "Seed (-1 = random)",
}
"""Each field's input, by its label on the page (which the message names)."""


@pytest.mark.parametrize("overrides, field", CASES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(CASES)])
def test_invalid_field_refused_on_cpu_tier(tiny, overrides, field):
    """The curl flow: refused at the POST, with 422 naming the input by its label (Gradio's
    validator, fed by the app's own checks), before anything is queued."""
    before = _calls(tiny.backend.url)
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{tiny.frontend.url}/gradio_api/call/generate", json={"data": gen_args(**overrides)})
    assert r.status_code == 422, r.text[:300]
    assert "event_id" not in r.text and "Traceback" not in r.text
    refused = [v for v in r.json()["detail"] if v.get("is_valid") is False]
    assert [v["parameter_name"] for v in refused] == [field], refused
    message = refused[0]["message"]
    assert message.startswith(LABELS[field] + ": "), message
    assert any(ch.isdigit() for ch in message), "the message names the allowed range"
    assert _calls(tiny.backend.url) == before, "an invalid request reached the GPU tier"


@pytest.mark.parametrize("overrides, field", [({"width": 100}, "width"), ({"prompt": ""}, "prompt")])
def test_gradio_client_raises_naming_the_input(tiny, overrides, field):
    """gradio_client: the same refusal, raised before the call is queued."""
    from gradio_client import Client
    from gradio_client.exceptions import ValidationError

    before = _calls(tiny.backend.url)
    client = Client(tiny.frontend.url, verbose=False)
    with pytest.raises(ValidationError) as caught:
        client.predict(*gen_args(**overrides), api_name="/generate")
    said = str(caught.value).splitlines()
    assert len(said) == 2, said
    assert said[1].startswith(f"- {field}: {LABELS[field]}: "), said
    assert _calls(tiny.backend.url) == before, "an invalid request reached the GPU tier"


# -- issue 11: text must be text, and an error echoes a short value ---------------------------
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("bad, words", [("a \ud800 fox", "UTF-8"), ("a \udfff", "UTF-8"), ("a\x00b", "NUL")])
def test_text_must_be_valid_utf8_without_nul(field, bad, words):
    """First release: a lone surrogate passed and crashed the model (and, batched, its neighbours)."""
    from splitspace.shared.contract.errors import ValidationFailed
    from splitspace.shared.contract.schema import validate_request

    with pytest.raises(ValidationFailed) as caught:
        validate_request(**{"prompt": "a fox", field: bad})
    assert caught.value.field == field and words in caught.value.message


@pytest.mark.parametrize(
    "field, value",
    [
        ("width", "9" * 1_000_000),
        ("seed", 10**1000),
        ("guidance_scale", ["x"] * 10_000),
        ("steps", {"a": "b" * 100_000}),
    ],
)
def test_an_error_echoes_at_most_a_short_value(field, value):
    """First release: a 1 MB ``width`` gave a 1 MB error."""
    from splitspace.shared.contract.errors import ValidationFailed
    from splitspace.shared.contract.schema import request_from_dict, validate_request

    with pytest.raises(ValidationFailed) as caught:
        validate_request(**{"prompt": "a fox", field: value})
    assert len(caught.value.message) < 150, caught.value.message[:300]
    with pytest.raises(ValidationFailed) as unknown:
        request_from_dict({"prompt": "a fox", "z" * 100_000: 1})
    assert len(unknown.value.message) < 150
