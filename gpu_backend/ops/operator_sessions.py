"""What the operators' defences remember: login sessions that end, and wrong guesses per address.

Why this module exists: Gradio's login (``auth=``) keeps every session token it ever
issued in a plain dict (``App.tokens``) that nothing empties but a logout, and counts no
wrong passwords; the admin API counted no wrong tokens either. Both are bounded here:

- :class:`OperatorSessions` replaces that dict (``mount_dashboard``): a session lasts
  ``lifetime_s`` from its login (12 h), then its token is unknown, whatever its cookie
  says; at most ``max_sessions`` are kept (a new login drops the oldest).
- :class:`GuessThrottle`: ``max_failures`` wrong tokens or passwords (5) from one address
  within ``window_s`` (60 s), and that address is refused until the oldest of them is
  ``window_s`` old. Other addresses are not affected (the right token works from
  elsewhere). At most ``max_addresses`` addresses are remembered; entries whose failures
  are all older than the window are dropped as new ones arrive, so memory follows the
  addresses that guessed in the last minute.

Both take a clock (``time.monotonic`` by default) so that their tests can move time.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, MutableMapping

__all__ = ["SESSION_S", "OperatorSessions", "GuessThrottle"]

SESSION_S = 12 * 3600.0
"""How long a dashboard login lasts (cookie ``Max-Age`` and the server-side session alike)."""
MAX_SESSIONS = 64
MAX_FAILURES = 5
WINDOW_S = 60.0
MAX_ADDRESSES = 10_000


class OperatorSessions(MutableMapping[str, str]):
    """Gradio's ``App.tokens`` (session token -> user name), with an end: a token is
    forgotten ``lifetime_s`` after it was issued, and at most ``max_sessions`` are held."""

    def __init__(
        self,
        *,
        lifetime_s: float = SESSION_S,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lifetime_s <= 0 or max_sessions < 1:
            raise ValueError("lifetime_s must be > 0 and max_sessions >= 1")
        self.lifetime_s = lifetime_s
        self.max_sessions = max_sessions
        self.clock = clock
        self._sessions: dict[str, tuple[str, float]] = {}  # token -> (user, ends at); oldest first

    def _purge(self) -> None:
        now = self.clock()
        for token in [t for t, (_, ends) in self._sessions.items() if ends <= now]:
            del self._sessions[token]

    def __getitem__(self, token: str) -> str:
        user, ends = self._sessions[token]
        if ends <= self.clock():
            del self._sessions[token]
            raise KeyError(token)
        return user

    def __setitem__(self, token: str, user: str) -> None:
        self._purge()
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]
        self._sessions[token] = (user, self.clock() + self.lifetime_s)

    def __delitem__(self, token: str) -> None:
        del self._sessions[token]

    def __iter__(self) -> Iterator[str]:
        self._purge()
        return iter(list(self._sessions))

    def __len__(self) -> int:
        self._purge()
        return len(self._sessions)


class GuessThrottle:
    """Wrong tokens and passwords per address; see the module docstring."""

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window_s <= 0 or max_addresses < 1:
            raise ValueError("max_failures and max_addresses must be >= 1, window_s > 0")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self.clock = clock
        # address -> times of its last failures (at most max_failures); least recently failed first
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again: 0 when it may now."""
        times = self._failures.get(address)
        if times is None or len(times) < self.max_failures:
            return 0.0
        return max(0.0, times[0] + self.window_s - self.clock())

    def retry_after_whole_s(self, address: str) -> int:
        """:meth:`retry_after` as a ``Retry-After`` header wants it (whole seconds, at least 1)."""
        return max(1, math.ceil(self.retry_after(address)))

    def failed(self, address: str) -> None:
        """One wrong token or password from ``address``."""
        now = self.clock()
        stale = now - self.window_s
        while self._failures:  # forget addresses whose last failure left the window
            oldest = next(iter(self._failures))
            if self._failures[oldest][-1] > stale:
                break
            del self._failures[oldest]
        times = self._failures.pop(address, None) or deque(maxlen=self.max_failures)
        while times and times[0] <= stale:
            times.popleft()
        times.append(now)
        self._failures[address] = times
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
