"""A signed note of the caller's address, for Gradio's MCP loopback hop.

Why it exists: Gradio runs a queued MCP tool call by calling this same
frontend through a ``gradio_client`` on loopback, with the MCP request's
headers. On that second request the peer is 127.0.0.1 and
``X-Forwarded-For`` is whatever the MCP caller wrote, so neither says who the
caller is: every anonymous MCP caller would be one client ``addr:127.0.0.1``,
or any caller could name its own address.

So the frontend, when it receives the MCP request itself, resolves the
caller's address by the usual rule (``address.py``) and adds
``X-Splitspace-Caller`` (:data:`shared.contract.headers.CALLER_HEADER`), a stamp
signed with the tiers' secret (its own salt) that carries that address and
expires within a minute. Gradio forwards it on the loopback call, and the
identity resolver believes the address in a valid stamp over the peer and
any ``X-Forwarded-For``. A stamp a caller sends is replaced, never believed
unsigned; callers never see one (it only travels from the frontend to itself).
API keys and cookies need no stamp: Gradio forwards them as they came.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from itsdangerous import BadSignature, TimestampSigner

CALLER_SALT = "splitspace.caller.v1"
DEFAULT_MAX_AGE_S = 60.0


class CallerStamps:
    """Sign and read caller-address stamps. With no secret, nothing is stamped or believed."""

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        keys = [s for s in secrets if s]

        class ClockedSigner(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(clock())

        # itsdangerous wants the oldest key first; ours come newest first.
        self._signer = ClockedSigner(list(reversed(keys)), salt=CALLER_SALT) if keys else None
        self._max_age_s = max_age_s

    @property
    def configured(self) -> bool:
        return self._signer is not None

    def stamp(self, address: str) -> str | None:
        if self._signer is None:
            return None
        return self._signer.sign(address.encode()).decode("ascii")

    def read(self, value: str | None) -> str | None:
        """The address in a valid, unexpired stamp; None for anything else."""
        if self._signer is None or not value or len(value) > 512:
            return None
        try:
            # itsdangerous annotates max_age as int; it compares it with a float age, so a float works
            return self._signer.unsign(value, max_age=self._max_age_s).decode()  # type: ignore[call-overload]
        except (BadSignature, UnicodeDecodeError, ValueError):
            return None
