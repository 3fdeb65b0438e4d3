"""API keys of machine clients, checked against the quota file's sha256 digests.

Only digests are stored. Every lookup hashes the presented key and compares
it with each stored digest in constant time, so neither the key nor timing
leaks which digest was close.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from splitspace.shared.contract.quotas import ApiKey


def hash_key(raw: str) -> str:
    """The hex sha256 of a raw key, as written in the quota file."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


class ApiKeyring:
    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._keys = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, raw: str) -> ApiKey | None:
        digest = hash_key(raw)
        found: ApiKey | None = None
        for key in self._keys:  # no early exit: same work whichever key matches
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found
