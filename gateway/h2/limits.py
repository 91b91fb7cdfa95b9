"""Rate budgets for what a peer may make the gateway do (pure: time comes in as `now`).

A token bucket: `burst` tokens to start, `rate` more per second, never above `burst`. A peer
that spends faster than `rate` for longer than `burst` allows has shown it is not a normal
client (rapid reset, PING and SETTINGS floods, streams opened past the limit).
"""

from __future__ import annotations


class RateBudget:
    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, *, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp: float | None = None

    def spend(self, now: float, n: float = 1.0) -> bool:
        """Takes `n` tokens; False (and nothing taken) if there are not that many."""
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < n:
            return False
        self._tokens -= n
        return True
