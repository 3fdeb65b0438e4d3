"""Logs an attacker cannot fill: every record is truncated, and the rate of records is capped.

Why it exists: both tiers are public, and every log line a request can cause
is disk and attention an outsider can spend. The first release logged a full
traceback for each malformed call, and Gradio prints every input of a
wrong-arity call: 300 bad requests added 10.9 MB to the frontend's log. The
guard (``shared/http/guard.py``) now refuses those calls with one INFO line at
most; this module bounds whatever is left, whoever logs it:

- :class:`LogCap`, a ``logging.Filter`` for handlers: a message longer than
  ``max_chars`` is cut (with its length said), a traceback keeps its last
  ``max_traceback_chars`` (where the error is), and at most ``burst`` records
  pass per ``window_s``; the next record after a window that dropped some says
  how many were dropped.
- :func:`route_gradio_tracebacks`: Gradio prints tracebacks with
  ``traceback.print_exc()`` straight to stderr, past any logging filter; this
  sends them through the ``gradio.traceback`` logger instead, so the cap holds
  for them too.
- :func:`uvicorn_log_config`: uvicorn's own logging config with the cap on
  every handler and a root handler for the application's loggers (the tiers'
  ``splitspace.*`` and Gradio's), for ``uvicorn.run(log_config=...)``.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

MAX_CHARS = 2000
MAX_TRACEBACK_CHARS = 4000
BURST = 60
WINDOW_S = 10.0
_GRADIO_MODULES = ("gradio.queueing", "gradio.routes", "gradio.route_utils", "gradio.utils", "gradio.blocks")


class LogCap(logging.Filter):
    """Truncates each record and caps the number of records per window (see the module docstring).

    One instance guards one budget: attach the same instance to every handler of a
    process. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        *,
        max_chars: int = MAX_CHARS,
        max_traceback_chars: int = MAX_TRACEBACK_CHARS,
        burst: int = BURST,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if max_chars < 20 or max_traceback_chars < 20 or burst < 1 or window_s <= 0:
            raise ValueError("LogCap: max_chars and max_traceback_chars >= 20, burst >= 1, window_s > 0")
        self.max_chars = max_chars
        self.max_traceback_chars = max_traceback_chars
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._passed = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_splitspace_capped", None) is not None:
            return bool(record._splitspace_capped)  # type: ignore[attr-defined]
        with self._lock:
            now = self.clock()
            dropped_before = 0
            if now - self._window_start >= self.window_s:
                self._window_start = now
                self._passed = 0
                dropped_before, self._dropped = self._dropped, 0
            if self._passed >= self.burst:
                self._dropped += 1
                record._splitspace_capped = False
                return False
            self._passed += 1
        self._truncate(record, dropped_before)
        record._splitspace_capped = True
        return True

    def _truncate(self, record: logging.LogRecord, dropped_before: int) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not take the log line (or the caller) down
            record.msg, record.args = f"{str(record.msg)[: self.max_chars]!r} (unformattable arguments)", None
            message = record.msg
        if len(message) > self.max_chars:
            if isinstance(record.args, tuple) and record.args:
                # Cut the arguments, keeping the format: uvicorn's access formatter reads them.
                each = max(20, self.max_chars // (len(record.args) + 1))
                record.args = tuple(_cut(a, each) if isinstance(a, str) else a for a in record.args)
                message = record.getMessage()
            if len(message) > self.max_chars and record.name != "uvicorn.access":
                record.msg, record.args = f"{_cut(message, self.max_chars)} ({len(message)} characters)", None
        if dropped_before:
            record.msg = f"({dropped_before} log records dropped in the last {self.window_s:g} s) {record.msg}"
        if record.exc_info and not record.exc_text:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = _tail(text, self.max_traceback_chars)
        elif record.exc_text:
            record.exc_text = _tail(record.exc_text, self.max_traceback_chars)
        if record.stack_info:
            record.stack_info = _tail(record.stack_info, self.max_traceback_chars)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... (cut)"


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"... ({len(text) - limit} characters of traceback cut)\n{text[-limit:]}"


_CAP: LogCap | None = None


def process_cap() -> LogCap:
    """The one LogCap of this process (created on first use), with Gradio's printed
    tracebacks routed through logging. Also the factory uvicorn's dictConfig calls."""
    global _CAP
    if _CAP is None:
        _CAP = LogCap()
    route_gradio_tracebacks()
    return _CAP


def route_gradio_tracebacks(modules: tuple[str, ...] = _GRADIO_MODULES) -> None:
    """Make ``traceback.print_exc()`` inside Gradio's modules log through ``gradio.traceback``
    (ERROR, with the exception), where :class:`LogCap` bounds it. Other ``traceback``
    functions are untouched. Modules not imported yet are imported here (a no-op if
    Gradio is absent)."""
    logger = logging.getLogger("gradio.traceback")

    def print_exc(  # noqa: ARG001 - traceback.print_exc's signature; it logs instead
        limit: int | None = None, file: SupportsWrite[str] | None = None, chain: bool = True
    ) -> None:
        logger.error("Gradio caught an exception", exc_info=sys.exc_info())

    for name in modules:
        try:
            module = __import__(name, fromlist=["_"])
        except ImportError:
            continue
        current = getattr(module, "traceback", None)
        if isinstance(current, types.ModuleType) and current is traceback:
            shim = types.ModuleType("traceback")
            shim.__dict__.update(traceback.__dict__)
            shim.print_exc = print_exc  # type: ignore[attr-defined]
            module.traceback = shim  # type: ignore[attr-defined]


def uvicorn_log_config(level: str = "warning") -> dict[str, Any]:
    """uvicorn's default logging config with :func:`process_cap` on every handler and a
    root handler at ``level`` (the tiers' and Gradio's loggers propagate to it)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"cap": {"()": "splitspace.shared.config.logs.process_cap"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["cap"]
    config["root"] = {"handlers": ["default"], "level": level.upper()}
    for name in ("uvicorn", "uvicorn.error"):
        config["loggers"].setdefault(name, {})["level"] = level.upper()
    return config
