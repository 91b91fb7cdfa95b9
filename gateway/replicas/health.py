"""Passive ejection with exponential backoff (pure: time comes in as arguments).

A replica whose connection fails (dial error, or lost with calls open) is ejected: it takes no
new builds until `until`, which doubles with each ejection in a row (base, 2 x base, ... up to
`cap`). After that the next successful probe re-admits it; a successful probe of a replica that
is admitted ends the streak, so the next ejection starts from `base` again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Streak:
    count: int
    until: float


class Ejections:
    def __init__(self, *, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        self._streaks: dict[str, _Streak] = {}
        self._ejected: set[str] = set()

    def eject(self, replica: str, now: float) -> float:
        """Ejects (or re-ejects) a replica; returns when it may be re-admitted."""
        streak = self._streaks.get(replica)
        count = 1 if streak is None else streak.count + 1
        until: float = now + min(self.cap, self.base * 2.0 ** (count - 1))
        self._streaks[replica] = _Streak(count, until)
        self._ejected.add(replica)
        return until

    def is_ejected(self, replica: str) -> bool:
        return replica in self._ejected

    def probe_ok(self, replica: str, now: float) -> bool:
        """A probe succeeded; returns whether the replica is (now) admitted."""
        streak = self._streaks.get(replica)
        if replica in self._ejected:
            if streak is not None and now < streak.until:
                return False
            self._ejected.discard(replica)
            return True
        self._streaks.pop(replica, None)  # healthy while admitted: the streak is over
        return True

    def forget(self, replica: str) -> None:
        self._streaks.pop(replica, None)
        self._ejected.discard(replica)
