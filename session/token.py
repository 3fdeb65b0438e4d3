"""The cross-tier identity token: minted by the frontend per request, verified by the GPU tier.

itsdangerous signs the identity with the tiers' shared secret(s): the newest
secret signs, every listed secret verifies, so secrets rotate without
downtime. A salt keeps these tokens apart from session cookies signed with
the same secret. Tokens carry their issue time and expire within a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from shared.errors import Unauthorized

from .identity import Identity

TOKEN_SALT = "splitspace.identity.v1"
DEFAULT_MAX_AGE_S = 60.0


def _clocked_signer(clock: Callable[[], float]) -> type[TimestampSigner]:
    """A TimestampSigner whose notion of "now" comes from ``clock`` (tests pin it)."""

    class ClockedSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(clock())

    return ClockedSigner


class IdentityTokens:
    """Mint and verify identity tokens. With no secret, minting fails and every verify refuses."""

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = [s for s in secrets if s]
        self._max_age_s = max_age_s
        self._serializer = (
            # itsdangerous wants the oldest key first; ours come newest first.
            URLSafeTimedSerializer(
                list(reversed(self._secrets)), salt=TOKEN_SALT, signer=_clocked_signer(clock)
            )
            if self._secrets
            else None
        )

    @property
    def configured(self) -> bool:
        return self._serializer is not None

    def mint(self, identity: Identity) -> str:
        if self._serializer is None:
            raise Unauthorized("no SPLITSPACE_SECRET configured; cannot sign identity tokens")
        return self._serializer.dumps(identity.to_dict())

    def verify(self, token: str | None) -> Identity:
        if self._serializer is None:
            raise Unauthorized("the GPU tier has no SPLITSPACE_SECRET configured and refuses all calls")
        if not token:
            raise Unauthorized("missing identity token (X-Splitspace-Identity)")
        try:
            data = self._serializer.loads(token, max_age=self._max_age_s)
            return Identity.from_dict(data)
        except SignatureExpired:
            raise Unauthorized("identity token expired") from None
        except (BadSignature, KeyError, TypeError, ValueError):
            raise Unauthorized("identity token is not valid") from None
