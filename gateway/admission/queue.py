"""The admission queue of one pool: builds waiting for a free replica slot.

Design: a FIFO of `Waiter`s. `admit(place)` walks the queue in order and asks `place` (the
shell's slot-aware pick) for a replica for each waiter; every waiter it places leaves the queue.
A waiter that cannot be placed does not stop the walk, because a later waiter may want another
replica (a bound connection waits for its own replica only); an unconstrained waiter can use
any free slot, so one that cannot be placed means no later unconstrained waiter can be either:
order is kept and nobody starves. Limits: at most `max_queue` waiters, each at most
`timeout` seconds. Pure: time comes in as arguments; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class Waiter:
    ref: str
    internal: bool
    key: str | None  # placement key (sticky), None for random
    target: str | None  # the replica it must run on (bound connection), else None
    enqueued: float
    deadline: float
    handle: Any = None  # the shell's way back to the waiting client stream
    ticket: int = field(default=0)


class AdmissionQueue:
    def __init__(self, *, max_queue: int, timeout: float) -> None:
        self.max_queue = max_queue
        self.timeout = timeout
        self._waiters: dict[int, Waiter] = {}  # insertion order = FIFO order
        self._next_ticket = 1

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self._waiters.values()))

    def offer(self, waiter: Waiter, now: float) -> bool:
        """Queues the waiter (stamping ticket and deadline); False when the queue is full."""
        if len(self._waiters) >= self.max_queue:
            return False
        waiter.ticket = self._next_ticket
        self._next_ticket += 1
        waiter.enqueued = now
        waiter.deadline = now + self.timeout
        self._waiters[waiter.ticket] = waiter
        return True

    def remove(self, ticket: int) -> Waiter | None:
        return self._waiters.pop(ticket, None)

    def ahead(self, ticket: int) -> int:
        """How many waiters are before this one."""
        for i, t in enumerate(self._waiters):
            if t == ticket:
                return i
        return 0

    def positions(self) -> dict[int, int]:
        return {t: i for i, t in enumerate(self._waiters)}

    def admit(self, place: Callable[[Waiter], str | None]) -> list[tuple[Waiter, str]]:
        """Offers every waiter, in order, to `place`; those it places leave the queue.

        A waiter is out of the queue while `place` runs (placing it may queue the next build
        of its connection, which must not find the queue fuller than it is); one that is not
        placed goes back to its place in the order, ahead of waiters offered meanwhile.
        """
        placed: list[tuple[Waiter, str]] = []
        waiting = list(self._waiters.values())
        kept: list[Waiter] = []
        for waiter in waiting:
            del self._waiters[waiter.ticket]
            replica = place(waiter)
            if replica is None:
                kept.append(waiter)
                self._waiters[waiter.ticket] = waiter
            else:
                placed.append((waiter, replica))
        newcomers = [w for w in self._waiters.values() if w.ticket not in {k.ticket for k in kept}]
        self._waiters = {w.ticket: w for w in (*kept, *newcomers)}
        return placed

    def expire(self, now: float) -> list[Waiter]:
        gone = [w for w in self._waiters.values() if w.deadline <= now]
        for w in gone:
            del self._waiters[w.ticket]
        return gone

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._waiters.values()), default=None)
