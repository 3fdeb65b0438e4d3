"""Hot reload of the operators' quota file: both tiers poll it (a stat per second works on
every filesystem, unlike inotify); a bad edit is logged and the last good version stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from splitspace.shared.contract.quotas import QuotaConfig, QuotaFileError, load_quotas

log = logging.getLogger("splitspace.quotas")


class QuotaWatcher:
    """The quota file in force, reloaded by :meth:`check` when it changed."""

    def __init__(self, path: str | Path | None, on_change: Callable[[QuotaConfig], None] | None = None) -> None:
        self.path = Path(path) if path else None
        self.on_change = on_change
        self.last_error: str | None = None
        self._stamp: tuple[float, int] | None = self._stat()
        self.current: QuotaConfig = load_quotas(self.path)  # a bad file at start is fatal

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat() if self.path is not None else None
        except OSError:
            return None
        return None if st is None else (st.st_mtime, st.st_size)

    def check(self) -> bool:
        """Reload if the file changed; True when a new version came into force."""
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            config = load_quotas(self.path)
        except QuotaFileError as exc:
            self.last_error = str(exc)
            log.error("quota file %s refused, keeping the last good version: %s", self.path, exc)
            return False
        self.current = config
        self.last_error = None
        log.info("quota file %s reloaded", self.path)
        if self.on_change is not None:
            self.on_change(config)
        return True
