"""The generate request, its limits and its result: one definition for both tiers.

The frontend validates with :func:`validate_request` before forwarding; the GPU
tier validates again (it trusts nothing) with the same function. Errors name
the field and the allowed values, in the manner of diffusers' ``check_inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from splitspace.shared.contract.errors import ValidationFailed

MAX_SEED = 2**32 - 1
ECHO_CHARS = 40
"""The most characters of a sent value that an error message shows (a 1 MB ``width`` must
not become a 1 MB error, or a 1 MB log line)."""


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: what an error may show of an input."""
    if isinstance(value, (str, bytes)) and len(value) > limit * 4:
        value = value[: limit * 4]
    try:
        text = repr(value)
    except ValueError:  # an int over Python's digit limit
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Limits:
    """Allowed values of each request field (configurable, see Settings)."""

    prompt_max_chars: int = 1000
    negative_prompt_max_chars: int = 1000
    min_side: int = 64
    max_side: int = 1024
    side_multiple: int = 8
    min_steps: int = 1
    max_steps: int = 50
    min_guidance: float = 0.0
    max_guidance: float = 20.0


@dataclass(frozen=True)
class GenerateRequest:
    """A validated text-to-image request. ``steps``/``guidance_scale`` of None
    mean "the model preset"; ``seed`` of -1 means "pick one at random"."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = -1

    @property
    def pixels(self) -> int:
        return self.width * self.height


REQUEST_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(GenerateRequest))
"""The request's fields in order: the built-in's ``generate`` takes them positionally."""


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValidationFailed(name, f"must be an integer, got {echo(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValidationFailed(name, f"must be an integer, got {echo(value)}")
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= 40:  # int() of a huge digit string is slow
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValidationFailed(name, f"must be an integer, got {echo(value)}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or (isinstance(value, str) and len(value) > 40):
        raise ValidationFailed(name, f"must be a number, got {echo(value)}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValidationFailed(name, f"must be a number, got {echo(value)}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValidationFailed(name, f"must be a finite number, got {echo(value)}")
    return out


def _text(name: str, value: str) -> None:
    """Valid UTF-8 text: no lone surrogates (they cannot be encoded, and crash the model's
    tokenizer) and no NUL (a C string's end, in every library below us)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationFailed(name, f"must be valid UTF-8 text: a lone surrogate at character {exc.start}") from None
    if "\x00" in value:
        raise ValidationFailed(name, f"must not contain NUL characters (one at character {value.index(chr(0))})")


def _side(name: str, value: object, limits: Limits) -> int:
    v = _as_int(name, value)
    lo, hi, m = limits.min_side, limits.max_side, limits.side_multiple
    if not lo <= v <= hi or v % m:
        raise ValidationFailed(name, f"must be a multiple of {m} from {lo} to {hi}, got {echo(v)}")
    return v


def validate_request(
    *,
    prompt: Any,
    negative_prompt: Any = "",
    width: Any = 512,
    height: Any = 512,
    steps: Any = None,
    guidance_scale: Any = None,
    seed: Any = -1,
    limits: Limits = Limits(),
) -> GenerateRequest:
    """Check every field and return the request, or raise ValidationFailed naming the field."""
    if not isinstance(prompt, str):
        raise ValidationFailed("prompt", "must be text")
    _text("prompt", prompt)
    text = prompt.strip()
    if not 1 <= len(text) <= limits.prompt_max_chars:
        raise ValidationFailed(
            "prompt",
            f"must be 1 to {limits.prompt_max_chars} characters after stripping, got {len(text)}",
        )
    if negative_prompt is None:
        negative_prompt = ""
    if not isinstance(negative_prompt, str):
        raise ValidationFailed("negative_prompt", "must be text")
    _text("negative_prompt", negative_prompt)
    if len(negative_prompt) > limits.negative_prompt_max_chars:
        raise ValidationFailed(
            "negative_prompt",
            f"must be at most {limits.negative_prompt_max_chars} characters, got {len(negative_prompt)}",
        )
    w = _side("width", width, limits)
    h = _side("height", height, limits)
    n_steps: int | None = None
    if steps is not None:
        n_steps = _as_int("steps", steps)
        if not limits.min_steps <= n_steps <= limits.max_steps:
            raise ValidationFailed(
                "steps", f"must be from {limits.min_steps} to {limits.max_steps}, got {echo(n_steps)}"
            )
    g: float | None = None
    if guidance_scale is not None:
        g = _as_float("guidance_scale", guidance_scale)
        if not limits.min_guidance <= g <= limits.max_guidance:
            raise ValidationFailed(
                "guidance_scale",
                f"must be from {limits.min_guidance:g} to {limits.max_guidance:g}, got {g:g}",
            )
    s = _as_int("seed", seed)
    if not -1 <= s <= MAX_SEED:
        raise ValidationFailed("seed", f"must be -1 (random) or from 0 to {MAX_SEED}, got {echo(s)}")
    return GenerateRequest(
        prompt=text,
        negative_prompt=negative_prompt,
        width=w,
        height=h,
        steps=n_steps,
        guidance_scale=g,
        seed=s,
    )


def request_from_dict(data: dict[str, Any], limits: Limits = Limits()) -> GenerateRequest:
    """Validate a request that arrived as a dict (the GPU tier's view)."""
    unknown = set(data) - set(REQUEST_FIELDS)
    if unknown:
        name = sorted(map(str, unknown))[0]
        echo = name if len(name) <= ECHO_CHARS else name[: ECHO_CHARS - 3] + "..."
        raise ValidationFailed(echo, "is not a request field")
    if "prompt" not in data:
        raise ValidationFailed("prompt", "is required")
    return validate_request(limits=limits, **data)
