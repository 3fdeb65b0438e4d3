"""Each client's limits as the scheduler reads them: the live quota file plus operators' overrides.

Overrides are written through to the usage store (they survive restarts) and read from memory.
"""

from __future__ import annotations

from collections.abc import Callable

from splitspace.gpu_backend.admission.scheduler import ClientRef
from splitspace.gpu_backend.stores.usage import OverrideStore
from splitspace.shared.contract.quotas import OverrideValues, QuotaConfig, Tier


class Overrides:
    """Operator overrides per client id: an in-memory view written through to the store."""

    def __init__(self, store: OverrideStore, on_change: Callable[[str | None], None] = lambda client_id: None) -> None:
        """``on_change``: called after every change (with None for changes made elsewhere)."""
        self._store = store
        self._version: int | None = None  # read at the first refresh (shared stores only)
        self._cache: dict[str, OverrideValues] = dict(store.all_overrides())
        self.on_change = on_change

    def refresh(self) -> None:
        """Re-read every override if another replica changed one (about once a second)."""
        version = self._store.overrides_version()
        if version == self._version:
            return
        self._cache = dict(self._store.all_overrides())
        self._version = version
        self.on_change(None)

    def get(self, client_id: str) -> OverrideValues:
        return self._cache.get(client_id, {})

    def set(self, client_id: str, values: OverrideValues) -> OverrideValues:
        """Set checked overrides (:func:`~shared.contract.quotas.validate_overrides`) over
        those in force; the values now in force."""
        self._store.set_overrides(client_id, values)
        self._cache[client_id] = {**self._cache.get(client_id, {}), **values}
        self.on_change(client_id)
        return self._cache[client_id]

    def clear(self, client_id: str) -> None:
        self._store.clear_overrides(client_id)
        self._cache.pop(client_id, None)
        self.on_change(client_id)

    def all(self) -> dict[str, OverrideValues]:
        return dict(self._cache)


def limits_function(config: Callable[[], QuotaConfig], overrides: Overrides) -> Callable[[ClientRef], Tier]:
    """The scheduler's view of limits: the live quota file plus operator overrides."""

    def limits(client: ClientRef) -> Tier:
        return config().limits_for(client.client_id, client.tier, overrides.get(client.client_id))

    return limits
