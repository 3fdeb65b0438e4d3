"""Every validation rule is refused on the CPU tier, naming the field; the GPU tier never sees it."""

from __future__ import annotations

import httpx
import pytest

from tests.clients import call_rest, error_text, gen_args


def _calls(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("splitspace_infer_calls_total"):
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


@pytest.mark.parametrize("overrides, field", CASES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(CASES)])
def test_invalid_field_refused_on_cpu_tier(tiny, overrides, field):
    before = _calls(tiny.backend.url)
    with httpx.Client(timeout=30) as c:
        final, events = call_rest(c, tiny.frontend.url, "generate", gen_args(**overrides))
    text = error_text(events)
    assert final == "error"
    assert text.startswith("Invalid request: " + field + ":"), text
    assert any(ch.isdigit() for ch in text), "the message names the allowed range"
    assert "Traceback" not in text
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
