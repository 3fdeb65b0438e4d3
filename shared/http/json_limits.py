"""Limits on the shape of a JSON request body, checked on its bytes before any parser reads it.

Why it exists: the body-size limit alone lets a small body hurt the parsers behind
it. Python's ``json`` (Starlette's ``Request.json``, Gradio's routes, the guard, the
GPU tier's direct route) recurses once per level, so 10 KB of ``[`` raised
``RecursionError``, which nobody catches as a parse error: a 500, a logged
traceback, and a broken keep-alive connection. It turns a literal of more than
4,300 digits into a ``ValueError`` deep inside a route, and reads ``NaN``,
``Infinity`` and ``1e999`` (none of them JSON) as floats that no validation expects.

So :meth:`JsonLimits.check` reads the bytes at C speed (a few regular expressions
and byte counts, no parse): string literals are cut out (their length checked);
in the rest, number literals are checked for length, and the constants JSON does
not have and exponents that overflow are refused; the brackets and commas left
count the items, and where there are more brackets than ``max_depth``, their
running count is the depth. A body that passes nests at most ``max_depth``
levels, which every parser behind it takes. The limits are the defaults here, in one place; every call of Gradio's own
clients (``gradio_client``, ``@gradio/client``, the page, MCP) fits them many times.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MAX_DEPTH = 32
"""Levels of nested arrays and objects. A Gradio call is 3 to 6 (``{"data": [{"meta": {...}}]}``)."""
DEFAULT_MAX_ITEMS = 1000
"""Items of all arrays and objects together (a key and its value: one item). A Gradio call
has a dozen; the page's call with its history of 12 images, about 130."""
DEFAULT_MAX_STRING_BYTES = 32 * 1024
"""One string literal as sent (escapes included). A 1,000-character prompt written as
``\\u`` escapes is at most 12,000 bytes; a thumbnail of the page's history, about 11,000."""
DEFAULT_MAX_NUMBER_CHARS = 40
"""One number literal: a seed up to 2**128, or any float written in full (at most 24)."""
MAX_PARSER_DEPTH = 200
"""The deepest a limit may allow: pydantic-core refuses beyond 200 levels, Python's ``json``
fails near 1,000."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
"""A string literal, as a JSON parser reads one: from a quote to the next one not escaped."""
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
"""Objects read as arrays: the depth is the same (brackets that do not match: not JSON anyway)."""
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")
"""An opening bracket as +1, a closing one as -1 (read as signed bytes)."""
_CONSTANT = re.compile(rb"NaN|Infinity")
_BIG_EXPONENT = re.compile(rb"[0-9][0-9.]*[eE]\+?[0-9]{3,}")
"""A number that may overflow: none with fewer characters than the limit and an exponent under 100 does."""


class JsonLimitExceeded(ValueError):
    """The body breaks a limit; ``message`` names what it has ("nesting deeper than 32
    levels"). ``malformed``: it cannot be JSON at all (a constant JSON does not have,
    brackets that do not balance) rather than too big in one dimension."""

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.malformed = malformed


@dataclass(frozen=True)
class JsonLimits:
    """The limits of one tier's bodies (see the module docstring); ``check`` enforces them."""

    max_depth: int = DEFAULT_MAX_DEPTH
    max_items: int = DEFAULT_MAX_ITEMS
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES
    max_number_chars: int = DEFAULT_MAX_NUMBER_CHARS
    _long_number: re.Pattern[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.max_depth <= MAX_PARSER_DEPTH:
            raise ValueError(f"max_depth must be 1 to {MAX_PARSER_DEPTH}, got {self.max_depth}")
        if min(self.max_items, self.max_string_bytes, self.max_number_chars) < 1:
            raise ValueError("max_items, max_string_bytes and max_number_chars must be at least 1")
        object.__setattr__(self, "_long_number", re.compile(rb"[0-9][0-9.eE+-]{%d,}" % self.max_number_chars))

    def check(self, body: bytes) -> None:
        """Return if ``body`` keeps every limit; else raise :class:`JsonLimitExceeded` naming one."""
        # An item has at most two strings (a key and its value): a bound before any regex runs.
        if body.count(b'"') - body.count(b'\\"') > 4 * self.max_items:
            raise self._too_many_items()
        rest = _STRING.sub(b'""', body)
        # Only when the strings together are longer than the limit can one of them be.
        if (
            len(body) - len(rest) > self.max_string_bytes
            and max(map(len, _STRING.findall(body))) - 2 > self.max_string_bytes
        ):
            raise JsonLimitExceeded(f"a string longer than {self.max_string_bytes} bytes")
        self._check_structure(rest.translate(None, _NOT_STRUCTURE))
        self._check_numbers(rest)

    def _check_numbers(self, rest: bytes) -> None:
        if self._long_number.search(rest):
            raise JsonLimitExceeded(f"a number longer than {self.max_number_chars} characters")
        if _CONSTANT.search(rest):
            raise JsonLimitExceeded("NaN or Infinity, which JSON does not have", malformed=True)
        for number in _BIG_EXPONENT.findall(rest):
            if math.isinf(float(number)):
                raise JsonLimitExceeded("a number out of range (at most about 1.8e308)", malformed=True)

    def _check_structure(self, skeleton: bytes) -> None:
        """Items: one per comma, one per container (an item of its parent, or the body).
        Depth: the running count of open brackets (numpy's ``cumsum``: linear, in C)."""
        brackets = skeleton.translate(_ONE_KIND, b",")
        opened = brackets.count(b"[")
        if opened > self.max_depth or opened * 2 != len(brackets):  # else it cannot nest deeper
            depth = np.frombuffer(brackets.translate(_STEPS), dtype=np.int8).cumsum(dtype=np.int32)
            if depth.max() > self.max_depth:
                raise JsonLimitExceeded(f"nesting deeper than {self.max_depth} levels")
            if depth.min() < 0 or depth[-1] != 0:
                raise JsonLimitExceeded("brackets that do not balance", malformed=True)
        if skeleton.count(b",") + opened > self.max_items:
            raise self._too_many_items()

    def _too_many_items(self) -> JsonLimitExceeded:
        return JsonLimitExceeded(f"more than {self.max_items} items in its arrays and objects")


DEFAULT_LIMITS = JsonLimits()
"""The limits both tiers use (``GradioGuard``'s default)."""
