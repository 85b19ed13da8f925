# -*- test-case-name: tests.test_throttle -*-
"""
Brute-force protection for password logins (SMTP AUTH, IMAP, POP3).

Failures are counted per client address and per user name over a sliding
window.  From the L{free}-th failure on, each further answer is delayed,
doubling up to L{max_delay}; a client address with L{limit} failures is
refused outright (C{421}) until its failures age out of the window.  A
user name under attack is slowed, never locked: locking would let anyone
shut a user out.  Good clients from other addresses are not touched.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IReactorTime


class LoginThrottle:
    """
    Counts failed logins by client address and by user, on an injected clock.
    """

    window = 900.0
    free = 3
    max_delay = 16.0
    limit = 10

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        cutoff = self.clock.seconds() - self.window
        while times and times[0] < cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def blocked(self, address: str) -> bool:
        """
        Whether this client address has failed too often to try again now.
        """
        return self._recent("ip:" + address) >= self.limit

    def delay(self, address: str, user: str | None) -> float:
        """
        How long to wait before answering this client's next login attempt.
        """
        failures = max(self._recent("ip:" + address),
                       self._recent("user:" + user) if user else 0)
        if failures < self.free:
            return 0.0
        return min(2.0 ** (failures - self.free), self.max_delay)

    def failed(self, address: str, user: str | None) -> None:
        now = self.clock.seconds()
        for key in ("ip:" + address, "user:" + user if user else None):
            if key is not None:
                self._failures.setdefault(key, deque(maxlen=self.limit * 4)).append(now)
                self._recent(key)
        if len(self._failures) > 100_000:
            # An attack from very many addresses: forget the oldest entries.
            for key in list(self._failures)[: len(self._failures) // 2]:
                del self._failures[key]

    def succeeded(self, address: str, user: str) -> None:
        self._failures.pop("ip:" + address, None)
