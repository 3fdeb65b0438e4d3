"""The cross-tier identity token: minted by the frontend per request, verified by the GPU tier.

itsdangerous signs the identity with the tiers' shared secret(s): the newest
secret signs, every listed secret verifies, so secrets rotate without
downtime. A salt keeps these tokens apart from session cookies signed with
the same secret. Tokens carry their issue time and expire within a minute.

A token is good for one call only: it names its purpose (``call:<sha256 of
the call>``, :func:`call_purpose` of ``Call.digest()``: the function it calls and
its inputs; ``standing`` or ``health``) and carries a random nonce. The GPU tier
refuses a token whose purpose is not the call it came with (a captured token
cannot be used for another prompt) and one whose
nonce it has already seen within the token's lifetime (nor twice for the same
prompt). The nonces seen are kept per process (the fast path, and the whole check
without Redis); with ``SPLITSPACE_REDIS_URL`` a GPU tier also has its admission
check the nonce in Redis (``gpu_backend/stores/global_limits.py``: one more command in the
admission's one script), so a captured call is refused on every replica.
Without Redis, a token replayed to another replica within its lifetime runs there
once (docs/security.md).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from splitspace.session.identity import Identity
from splitspace.shared.contract.errors import Unauthorized

TOKEN_SALT = "splitspace.identity.v2"
DEFAULT_MAX_AGE_S = 60.0
STANDING = "standing"
HEALTH = "health"
TOKEN_REUSED = "identity token already used (each token is good for one call)"


def call_purpose(call_digest: str) -> str:
    """The purpose of a token for one call of a GPU function, given the call's digest
    (``splitspace.shared.contract.calls.Call.digest``)."""
    return f"call:{call_digest}"


@dataclass(frozen=True)
class Claims:
    """A verified token: who, and the one call it was issued for."""

    identity: Identity
    purpose: str
    nonce: str = ""

    def require(self, purpose: str) -> Identity:
        """The identity, if the token was issued for ``purpose``; else Unauthorized."""
        if not hmac.compare_digest(self.purpose.encode(), purpose.encode()):
            raise Unauthorized("identity token was issued for another request")
        return self.identity


class _SeenNonces:
    """Nonces of tokens already used, forgotten once their tokens have expired anyway.
    O(1) per check: a set, and a queue in expiry order for forgetting."""

    def __init__(self, max_age_s: float) -> None:
        self._max_age_s = max_age_s
        self._seen: set[str] = set()
        self._order: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()

    def first_use(self, nonce: str, now: float) -> bool:
        with self._lock:
            while self._order and self._order[0][0] <= now:
                self._seen.discard(self._order.popleft()[1])
            if nonce in self._seen:
                return False
            self._seen.add(nonce)
            self._order.append((now + self._max_age_s + 1.0, nonce))
            return True


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
        self._clock = clock
        self._nonces = _SeenNonces(max_age_s)
        self._serializer = (
            # itsdangerous wants the oldest key first; ours come newest first.
            URLSafeTimedSerializer(list(reversed(self._secrets)), salt=TOKEN_SALT, signer=_clocked_signer(clock))
            if self._secrets
            else None
        )

    @property
    def configured(self) -> bool:
        return self._serializer is not None

    @property
    def replay_window_s(self) -> float:
        """How long a shared store keeps a used nonce: twice a token's lifetime, so that a
        replica whose clock runs behind the frontend's (by up to a lifetime) still
        finds it while it would accept the token."""
        return 2 * self._max_age_s

    def mint(self, identity: Identity, purpose: str) -> str:
        """A token for one call of ``purpose`` (``call_purpose(...)``, STANDING, HEALTH)."""
        if self._serializer is None:
            raise Unauthorized("no SPLITSPACE_SECRET configured; cannot sign identity tokens")
        return self._serializer.dumps({**identity.to_dict(), "purpose": purpose, "nonce": secrets.token_urlsafe(12)})

    def verify(self, token: str | None) -> Claims:
        """Check the signature and the age, and use up the nonce; the caller then checks
        the purpose with :meth:`Claims.require` (once it knows the call)."""
        if self._serializer is None:
            raise Unauthorized("the GPU tier has no SPLITSPACE_SECRET configured and refuses all calls")
        if not token:
            raise Unauthorized("missing identity token (X-Splitspace-Identity)")
        try:
            # itsdangerous annotates max_age as int; it compares it with a float age, so a float works
            data = self._serializer.loads(token, max_age=self._max_age_s)  # type: ignore[arg-type]
            nonce = str(data["nonce"])
            claims = Claims(Identity.from_dict(data), str(data["purpose"]), nonce)
        except SignatureExpired:
            raise Unauthorized("identity token expired") from None
        except (BadSignature, KeyError, TypeError, ValueError):
            raise Unauthorized("identity token is not valid") from None
        if not self._nonces.first_use(nonce, self._clock()):
            raise Unauthorized(TOKEN_REUSED)
        return claims
