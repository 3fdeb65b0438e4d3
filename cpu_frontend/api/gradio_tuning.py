"""Two per-call costs Gradio 6 pays on every API call, removed for the frontend.

The frontend exists to forward calls cheaply, and a REST or ``gradio_client``
call is a new Gradio session each time. Profiling it (py-spy, ``bench/hop.py``)
found two costs that buy a forwarding tier nothing:

- ``SessionState.__init__`` renders the config of every block of the UI (23
  here, each through ``inspect.signature``) for deep links, on every new
  session, and each call then writes its inputs' and outputs' values into
  them: about 2 ms of CPU per call. :class:`LazyConfigValues` computes a
  block's entry, with the latest value written to it, only when something
  reads it (a deep link).
- Every call enters ``MatplotlibBackendMananger``, which imports matplotlib and
  switches its backend; without matplotlib installed that is a failed import
  (a search of ``sys.path``) twice per call. When matplotlib is absent the
  manager is replaced by a no-op.

Both are Gradio internals: each patch checks the shape it expects and leaves
Gradio untouched (with a log line) when that shape changed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from copy import copy
from typing import Any

log = logging.getLogger("splitspace.frontend")
_applied = False


class LazyConfigValues(dict):
    """``SessionState.config_values``, each block's entry computed on first read."""

    def __init__(self, blocks_config: Any, ids: list[int]) -> None:
        super().__init__()
        self._config = blocks_config
        self._order = ids
        self._pending = set(ids)
        self._values: dict[int, Any] = {}  # values written to entries not computed yet

    def defer_value(self, key: int, value: Any) -> bool:
        """Keep ``value`` for ``key``'s entry if that entry is not computed yet."""
        if key not in self._pending or dict.__contains__(self, key):
            return False
        self._values[key] = value
        return True

    def _compute(self, key: int) -> Any:
        config = self._config.config_for_block(key, [], self._config.blocks[key])
        if key in self._values and "props" in config:
            config["props"]["value"] = self._values.pop(key)
        dict.__setitem__(self, key, config)
        return config

    def __setitem__(self, key: int, config: Any) -> None:
        dict.__setitem__(self, key, config)
        self._values.pop(key, None)

    def _fill(self) -> None:
        """Compute every entry, in Gradio's own order (blocks first, in their order)."""
        if not self._pending:
            return
        for key in list(self._pending):
            if not dict.__contains__(self, key):
                self._compute(key)
        self._pending.clear()
        entries = dict(dict.items(self))
        dict.clear(self)
        for key in self._order:
            dict.__setitem__(self, key, entries.pop(key))
        dict.update(self, entries)

    def __missing__(self, key: int) -> Any:
        if key in self._pending:
            return self._compute(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self._pending

    def get(self, key: int, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[int]:
        self._fill()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._fill()
        return dict.__len__(self)

    def items(self):  # type: ignore[no-untyped-def]
        self._fill()
        return dict.items(self)

    def keys(self):  # type: ignore[no-untyped-def]
        self._fill()
        return dict.keys(self)

    def values(self):  # type: ignore[no-untyped-def]
        self._fill()
        return dict.values(self)


_SESSION_ATTRS = {"blocks_config", "config_values", "state_data", "_state_ttl", "is_closed", "STATE_TTL_WHEN_CLOSED"}


def _lazy_session_state() -> bool:
    from gradio import state_holder

    original = state_holder.SessionState
    if getattr(original, "_splitspace_lazy", False):
        return True

    # The shape check: Gradio's own __init__, run on an empty app, sets exactly these attributes.
    class EmptyBlocks:
        default_config = type("Config", (), {"blocks": {}})()
        blocks: dict[int, Any] = {}

    probe = original.__new__(original)
    original.__init__(probe, EmptyBlocks())  # type: ignore[arg-type]  # a stand-in with what __init__ reads
    if set(vars(probe)) != _SESSION_ATTRS or not hasattr(original, "_update_value_in_config"):
        return False

    def init(self: Any, blocks: Any) -> None:
        self.blocks_config = copy(blocks.default_config)
        self.config_values = LazyConfigValues(
            self.blocks_config, [k for k in self.blocks_config.blocks if k in blocks.blocks]
        )
        self.state_data = {}
        self._state_ttl = {}
        self.is_closed = False
        self.STATE_TTL_WHEN_CLOSED = probe.STATE_TTL_WHEN_CLOSED

    def update_value_in_config(self: Any, key: int, value: Any) -> None:
        if not self.config_values.defer_value(key, value):
            original._update_value_in_config(self, key, value)

    state_holder.SessionState = type(  # type: ignore[misc,assignment]  # a patch: a subclass made at run time
        "SessionState",
        (original,),
        {"__init__": init, "_update_value_in_config": update_value_in_config, "_splitspace_lazy": True},
    )
    return True


def _no_matplotlib_switch() -> bool:
    from gradio import utils

    if importlib.util.find_spec("matplotlib") is not None:
        return True  # installed: the manager's work is real
    if not hasattr(utils, "MatplotlibBackendMananger"):
        return False
    utils.MatplotlibBackendMananger = contextlib.nullcontext  # type: ignore[misc,assignment]  # a patch of a class
    return True


def apply() -> None:
    """Apply both (idempotent); a patch whose target changed shape is skipped and logged."""
    global _applied
    if _applied:
        return
    _applied = True
    for name, patch in (("lazy session config", _lazy_session_state), ("matplotlib switch", _no_matplotlib_switch)):
        try:
            ok = patch()
        except Exception:  # noqa: BLE001 - never let a tuning break the app
            ok = False
        if not ok:
            log.info("gradio tuning %r not applied: this Gradio differs from the one it was written for", name)
