"""Words for people: the page's statuses, captions, quota line and refusals.

Why this module exists: the API speaks in dicts (``position``, ``eta_s``, ``queue_s``,
``resets_in_s``) that API clients rely on; a person on the page should read sentences
("In line: 3rd · about 10 s", "16 of 300 GPU-s used · resets in 58 min"). Every
sentence the page shows is made here, from the same dicts the API returns, by pure
functions with no Gradio in them, so each wording is unit-tested and the page
(``page.py``) only places the text.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

from splitspace.shared.contract.errors import QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED

__all__ = [
    "GENERATING",
    "Refusal",
    "QuotaLine",
    "ordinal",
    "duration",
    "waiting",
    "wait_fraction",
    "caption",
    "quota_line",
    "refusal_text",
    "refusal_html",
    "quota_html",
    "RECENT_EMPTY",
    "RECENT_HEADING",
    "recent_template",
    "THROTTLE_TITLES",
]

GENERATING = "Generating..."
THROTTLE_TITLES = (QUEUE_FULL, QUOTA_EXCEEDED, RATE_LIMITED)
"""Refusals that a retry after some seconds can get past (the page counts those down)."""


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def duration(seconds: float) -> str:
    """A span of time as people say it, rounded up: "3 s", "58 min", "2 h 5 min"."""
    s = max(0, math.ceil(seconds))
    if s < 90:
        return f"{s} s"
    minutes = math.ceil(s / 60)
    if minutes < 120:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def waiting(status: dict[str, Any]) -> str:
    """The words for one status update of ``/generate`` (``{"status", "position", "eta_s"}``)."""
    if status.get("status") == "queued":
        position = int(status.get("position") or 0)
        eta = max(1.0, float(status.get("eta_s") or 0.0))
        place = f"In line: {ordinal(position)}" if position > 0 else "In line"
        return f"{place} · about {duration(eta)}"
    return GENERATING


def wait_fraction(waited_s: float, eta_s: float) -> float:
    """How much of the wait is behind the caller, for the progress bar (0 to 1)."""
    total = waited_s + max(0.0, eta_s)
    return 0.0 if total <= 0 else min(1.0, max(0.0, waited_s / total))


def _secs(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def caption(info: dict[str, Any]) -> str:
    """One line under the image: seed, size, steps, time on the GPU, time waited."""
    parts = [
        f"Seed {info['seed']}",
        f"{info['width']}×{info['height']}",
        f"{info['steps']} step{'s' if info['steps'] != 1 else ''}",
        f"{_secs(float(info['gpu_s']))} on the GPU",
        f"waited {_secs(float(info['queue_s']))}",
    ]
    return " · ".join(parts)


def _amount(value: float) -> str:
    if math.isinf(value):
        return "unlimited"
    return f"{value:.1f}" if 0 < value < 10 else f"{value:.0f}"


@dataclass(frozen=True)
class QuotaLine:
    """The limit that binds, as a sentence and a fraction for the bar."""

    text: str
    fraction: float
    scope: str
    """Whose limit binds: ``"you"`` (this key or session) or ``"address"`` (shared by its sessions)."""


def quota_line(standing: dict[str, Any]) -> QuotaLine:
    """``/quota``'s standing as "16 of 300 GPU-s used · resets in 58 min".

    Anonymous sessions have two ceilings, their own ``gpu_seconds`` and the
    ``address_gpu_seconds`` shared by every session from the address; the one with
    less left binds (the scheduler refuses on whichever runs out first), and the
    sentence says when it is the address's.
    """
    limits = standing.get("limits") or {}
    used = float(standing.get("used") or 0.0)
    limit = float(limits.get("gpu_seconds", math.inf))
    resets = float(standing.get("resets_in_s") or 0.0)
    scope = "you"
    address = standing.get("address")
    address_limit = limits.get("address_gpu_seconds")
    if isinstance(address, dict) and address_limit is not None:
        own_left = max(0.0, limit - used)
        if float(address.get("remaining", math.inf)) < own_left:
            used, limit, scope = float(address.get("used") or 0.0), float(address_limit), "address"
            resets = float(address.get("resets_in_s") or 0.0)
    if math.isinf(limit):
        return QuotaLine(f"{_amount(used)} GPU-s used · no limit", 0.0, scope)
    text = f"{_amount(used)} of {limit:g} GPU-s used"
    if scope == "address":
        text += " by your address"
    if resets > 0:
        text += f" · resets in {duration(resets)}"
    fraction = 1.0 if limit <= 0 else min(1.0, used / limit)
    return QuotaLine(text, fraction, scope)


@dataclass(frozen=True)
class Refusal:
    """A request the tiers turned down, as the page learns it.

    ``retry_s`` is None when waiting does not help (a bad field, a broken GPU tier);
    ``in_flight`` is how many of this caller's requests (its address's, for browser
    sessions and callers without a key) are in flight at this frontend, and
    ``shared_address`` says that they are counted by address: everyone behind it
    (a home, an office, a phone network) shares the count."""

    title: str
    message: str
    retry_s: float | None = None
    in_flight: int = 0
    shared_address: bool = False


def refusal_text(refusal: Refusal) -> tuple[str, str]:
    """``(sentence, after)``: the guidance, then what follows the countdown.

    For a throttling refusal ``after`` is "You can try again in" (the page appends the
    seconds, counting down); otherwise it is empty and the sentence stands alone.
    """
    title = refusal.title
    if title == QUEUE_FULL:
        # Never "full" here: beside "You can try again now" it read as a contradiction, and a
        # browser with nothing of its own in flight read "you have 5" about its neighbours'.
        sentence = _too_many(refusal.in_flight, refusal.shared_address)
    elif title == QUOTA_EXCEEDED:
        sentence = "Quota exceeded: the GPU time of this window is used up."
    elif title == RATE_LIMITED:
        sentence = "Rate limited: too many requests in the last minute."
    else:
        message = refusal.message.rstrip(".")
        return f"{title}: {message}.", ""
    return sentence, "You can try again in"


def _too_many(n: int, shared_address: bool) -> str:
    """A client's in-flight cap, saying whose requests are counted."""
    if shared_address:
        who = "from your network address (shared by everyone behind it)"
        if n <= 0:
            return f"Too many requests at once {who}."
        return f"Too many requests at once: {n} {'is' if n == 1 else 'are'} in flight {who}."
    if n <= 0:
        return "Too many requests at once: you have as many in flight as you may."
    return f"Too many requests at once: you have {n} in flight."


def refusal_html(refusal: Refusal) -> str:
    """The refusal as the page's notice: escaped text, and the countdown as an element
    whose ``data-seconds`` the page's script counts down."""
    sentence, after = refusal_text(refusal)
    out = f'<p class="splitspace-refusal" role="alert">{html.escape(sentence)}'
    if after and refusal.retry_s is not None:
        secs = max(1, math.ceil(refusal.retry_s))
        out += (
            f' <span class="splitspace-retry">{html.escape(after)} '
            f'<span class="splitspace-countdown" data-seconds="{secs}">{html.escape(duration(secs))}</span>.</span>'
        )
    return out + "</p>"


def quota_html(line: QuotaLine | None, problem: str | None = None) -> str:
    """The quota line and its bar (``None``: not known yet, or ``problem`` says why not)."""
    if line is None:
        text = f"Quota unknown: {problem}" if problem else "Checking your quota..."
        return f'<div class="splitspace-quota"><p>{html.escape(text)}</p></div>'
    pct = round(100 * line.fraction, 1)
    full = " full" if line.fraction >= 1 else ""
    return (
        '<div class="splitspace-quota">'
        f'<div class="splitspace-quota-bar{full}" role="progressbar" aria-label="GPU time used" '
        f'aria-valuemin="0" aria-valuemax="100" aria-valuenow="{pct:g}"><div style="width: {pct:g}%"></div></div>'
        f"<p>{html.escape(line.text)}</p></div>"
    )


RECENT_EMPTY = "Your recent images will appear here (kept in this browser only)."
RECENT_HEADING = "Your recent images (kept in this browser; click one to use its prompt and seed again)"


def recent_template() -> str:
    """The frame of this browser's recent images, as a ``gr.HTML`` template that the
    browser renders from the history it keeps (the history never goes to the server).
    Fixed words only: the page's script puts one button per image into the grid with
    the DOM (a stored prompt is text, never markup; gr.HTML evaluates its template as
    JavaScript, so no stored value may pass through it)."""
    return (
        '<div class="splitspace-recent">{{#if value.length}}<p>' + RECENT_HEADING + "</p>"
        '<div class="splitspace-recent-grid"></div>{{else}}<p class="splitspace-recent-empty">'
        + RECENT_EMPTY
        + "</p>{{/if}}</div>"
    )
