"""The page's words (``shared/app/ui_text.py``): statuses, captions, the quota line, refusals."""

from __future__ import annotations

import math
import re

import pytest

from splitspace.shared.app import ui_text
from splitspace.shared.app.ui_text import Refusal
from splitspace.shared.contract.errors import (
    BACKEND_UNAVAILABLE,
    INVALID_REQUEST,
    QUEUE_FULL,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
)

RAW_KEYS = ("eta_s", "queue_s", "gpu_s", "resets_in_s", "client_id", "position", "status")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1, "1st"),
        (2, "2nd"),
        (3, "3rd"),
        (4, "4th"),
        (11, "11th"),
        (12, "12th"),
        (13, "13th"),
        (21, "21st"),
        (22, "22nd"),
        (101, "101st"),
        (111, "111th"),
    ],
)
def test_ordinal(n: int, text: str) -> None:
    assert ui_text.ordinal(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "1 s"),
        (3, "3 s"),
        (9.7, "10 s"),
        (89, "89 s"),
        (90, "2 min"),
        (3480, "58 min"),
        (7100, "119 min"),
        (7199, "2 h"),
        (7200, "2 h"),
        (7500, "2 h 5 min"),
    ],
)
def test_duration_rounds_up_in_units_people_use(seconds: float, text: str) -> None:
    assert ui_text.duration(seconds) == text


def test_waiting_in_words() -> None:
    # The /generate status dict, as API clients get it.
    status = {"status": "queued", "position": 3, "eta_s": 9.7, "message": "position 3, about 10 s"}
    assert ui_text.waiting(status) == "In line: 3rd · about 10 s"
    assert ui_text.waiting({"status": "queued", "position": 1, "eta_s": 0.0}) == "In line: 1st · about 1 s"
    assert ui_text.waiting({"status": "running", "position": 0, "eta_s": 0.0}) == "Generating..."


def test_wait_fraction_is_the_part_of_the_wait_behind() -> None:
    assert ui_text.wait_fraction(0, 10) == 0
    assert ui_text.wait_fraction(5, 5) == 0.5
    assert ui_text.wait_fraction(3, 0) == 1
    assert ui_text.wait_fraction(0, 0) == 0


def test_caption_has_seed_size_steps_and_times_and_no_raw_keys() -> None:
    info = {
        "seed": 1234,
        "width": 512,
        "height": 768,
        "steps": 4,
        "guidance_scale": 0.0,
        "model": "m",
        "queue_s": 3.04,
        "gpu_s": 1.52,
        "total_s": 4.6,
        "client": "session:abc",
    }
    text = ui_text.caption(info)
    assert text == "Seed 1234 · 512×768 · 4 steps · 1.5 s on the GPU · waited 3.0 s"
    assert not any(k in text for k in RAW_KEYS)
    assert "1 step ·" in ui_text.caption({**info, "steps": 1})


def standing(**kw: object) -> dict:
    """A /quota answer, as gpu_backend.admission.scheduler.client_stats makes it."""
    doc = {
        "client": "session:s",
        "client_id": "session:s",
        "kind": "session",
        "tier": "anonymous",
        "limits": {"gpu_seconds": 300.0, "window_s": 3600.0, "address_gpu_seconds": 900.0},
        "queued": 0,
        "running": 0,
        "used": 16.2,
        "remaining": 283.8,
        "resets_in_s": 3480.0,
    }
    doc.update(kw)
    return doc


def test_quota_line_with_own_limit_binding() -> None:
    doc = standing(address={"used": 40.0, "remaining": 860.0, "resets_in_s": 3000.0})
    line = ui_text.quota_line(doc)
    assert line.text == "16 of 300 GPU-s used · resets in 58 min"
    assert line.scope == "you"
    assert line.fraction == pytest.approx(16.2 / 300)


def test_quota_line_says_when_the_address_binds() -> None:
    # The session used 16 of 300, but its address (all its sessions) used 880 of 900.
    doc = standing(address={"used": 880.0, "remaining": 20.0, "resets_in_s": 600.0}, remaining=20.0, resets_in_s=600.0)
    line = ui_text.quota_line(doc)
    assert line.text == "880 of 900 GPU-s used by your address · resets in 10 min"
    assert line.scope == "address"
    assert line.fraction == pytest.approx(880 / 900)


def test_quota_line_for_a_key_small_amounts_and_no_window_yet() -> None:
    doc = {"limits": {"gpu_seconds": 2.0, "window_s": 8.0}, "used": 1.53, "remaining": 0.47, "resets_in_s": 5.2}
    assert ui_text.quota_line(doc).text == "1.5 of 2 GPU-s used · resets in 6 s"
    fresh = {"limits": {"gpu_seconds": 600.0}, "used": 0.0, "remaining": 600.0, "resets_in_s": 0.0}
    assert ui_text.quota_line(fresh).text == "0 of 600 GPU-s used"
    over = {"limits": {"gpu_seconds": 1.0}, "used": 1.5, "remaining": 0.0, "resets_in_s": 3.0}
    assert ui_text.quota_line(over).fraction == 1.0
    unlimited = {"limits": {"gpu_seconds": math.inf}, "used": 3.0, "remaining": math.inf, "resets_in_s": 0.0}
    assert ui_text.quota_line(unlimited).text == "3.0 GPU-s used · no limit"


def test_quota_html_has_a_bar_and_the_sentence() -> None:
    out = ui_text.quota_html(ui_text.quota_line(standing()))
    assert 'role="progressbar"' in out and 'aria-valuenow="5.4"' in out
    assert "16 of 300 GPU-s used · resets in 58 min" in out
    assert "Quota unknown: GPU backend unavailable" in ui_text.quota_html(None, problem="GPU backend unavailable")


def test_queue_full_refusal_says_whose_requests_count_and_never_full() -> None:
    r = Refusal(QUEUE_FULL, "5 requests already in flight (max_running + max_queued = 5)", 2.2, in_flight=5)
    assert ui_text.refusal_text(r) == ("Too many requests at once: you have 5 in flight.", "You can try again in")
    html = ui_text.refusal_html(r)
    text = re.sub(r"<[^>]+>", "", html)
    assert text == "Too many requests at once: you have 5 in flight. You can try again in 3 s."
    assert 'data-seconds="3"' in html
    # A browser session is counted with everyone behind its address (issue 21: it read "you have 5").
    shared = Refusal(QUEUE_FULL, "x", 1.0, in_flight=5, shared_address=True)
    assert ui_text.refusal_text(shared)[0] == (
        "Too many requests at once: 5 are in flight from your network address (shared by everyone behind it)."
    )
    one = Refusal(QUEUE_FULL, "x", 1.0, in_flight=1, shared_address=True)
    assert ui_text.refusal_text(one)[0].startswith("Too many requests at once: 1 is in flight from your network")
    # Counted elsewhere (another frontend, the GPU tier's queue): still whose, never "full".
    assert ui_text.refusal_text(Refusal(QUEUE_FULL, "x", 5.0, shared_address=True))[0] == (
        "Too many requests at once from your network address (shared by everyone behind it)."
    )
    assert ui_text.refusal_text(Refusal(QUEUE_FULL, "x", 5.0))[0] == (
        "Too many requests at once: you have as many in flight as you may."
    )
    for case in (r, shared, one, Refusal(QUEUE_FULL, "x", 5.0)):
        # the page replaces the countdown with "You can try again now." when it ends
        assert "full" not in " ".join(ui_text.refusal_text(case)).lower()


def test_quota_and_rate_refusals_count_down_and_hide_the_limits_names() -> None:
    quota = Refusal(QUOTA_EXCEEDED, "1.5 of 2 GPU-seconds used in this window (gpu_seconds=2)", 125.0)
    text = re.sub(r"<[^>]+>", "", ui_text.refusal_html(quota))
    assert text == "Quota exceeded: the GPU time of this window is used up. You can try again in 3 min."
    rate = Refusal(RATE_LIMITED, "2 requests in the last 60 s (requests_per_minute=2)", 41.3)
    text = re.sub(r"<[^>]+>", "", ui_text.refusal_html(rate))
    assert text == "Rate limited: too many requests in the last minute. You can try again in 42 s."
    assert "=" not in text


def test_other_problems_stand_alone_without_countdown() -> None:
    bad = Refusal(INVALID_REQUEST, "prompt: must be 1 to 1000 characters after stripping, got 0")
    html = ui_text.refusal_html(bad)
    assert "countdown" not in html
    assert re.sub(r"<[^>]+>", "", html) == (
        "Invalid request: prompt: must be 1 to 1000 characters after stripping, got 0."
    )
    down = Refusal(BACKEND_UNAVAILABLE, "no GPU tier answered in 5 s.")
    assert ui_text.refusal_text(down) == ("GPU backend unavailable: no GPU tier answered in 5 s.", "")


def test_markup_escapes_what_people_typed() -> None:
    r = Refusal(INVALID_REQUEST, "prompt: <script>alert(1)</script>")
    assert "<script>" not in ui_text.refusal_html(r)
    # The recent images are drawn in the browser (tests/test_browser.py checks a prompt with
    # markup there); their frame is a gr.HTML template, which Gradio evaluates as JavaScript:
    # fixed words only, nothing that a template literal would run or break on.
    template = ui_text.recent_template()
    assert ui_text.RECENT_EMPTY in template and ui_text.RECENT_HEADING in template
    assert not [c for c in ("${", "`", "\\", "{{{") if c in template]


def test_the_page_tells_visitors_of_a_placeholder_model_once_and_no_operator_setting() -> None:
    """Issue 21: the page told visitors about `SPLITSPACE_MODEL` and `sleep:MS`, twice."""
    from splitspace.builtin.page import LiveModel

    for spec in ("tiny", "sleep:1500"):
        heading = LiveModel(lambda spec=spec: {"model": spec, "placeholder_model": True}).heading()
        assert heading.count("noise") == 1, heading
        assert "SPLITSPACE_MODEL" not in heading and spec not in heading and "sleep:" not in heading, heading
    real = LiveModel(lambda: {"model": "stabilityai/sd-turbo", "placeholder_model": False}).heading()
    assert "Model: `stabilityai/sd-turbo`" in real and "noise" not in real


def test_gradios_status_tracker_still_has_what_the_waiting_words_hook_blanks() -> None:
    """``page.STATUS_WORDS_JS`` blanks the "-" and "18.9%" text nodes that Gradio's StatusTracker
    puts after a progress's words in ``.progress-level-inner``. If Gradio changes that markup,
    this fails: look at the hook again (``tests/test_browser.py`` checks what a person sees)."""
    from pathlib import Path

    import gradio

    from splitspace.builtin.page import STATUS_WORDS_JS

    assets = Path(gradio.__file__).parent / "templates" / "frontend" / "assets"
    trackers = [p.read_text() for p in assets.glob("statustracker-*.js")]
    assert any('"progress-level-inner' in t and "`${e??``}%`" in t for t in trackers), "Gradio's StatusTracker changed"
    assert "#splitspace-image .progress-level-inner" in STATUS_WORDS_JS
