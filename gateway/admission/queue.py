"""The admission queue of one pool: builds waiting for a free replica slot.

Design: `Waiter`s in fair order between tenants (the client's certificate name, else its
address), in arrival order within a tenant. Fairness is start-time fair queueing with equal
weights: a waiter's tag is one more than the larger of its tenant's last tag and the virtual
time (the tag of the last waiter admitted), and the queue is served in (tag, arrival) order.
A tenant that queues 50 builds and one that then queues 1 alternate from there: the second
tenant's build goes second, not 51st. With one tenant the order is plain FIFO.

`admit(place)` walks the queue in that order and asks `place` (the shell's slot-aware pick)
for a replica for each waiter; every waiter it places leaves the queue. A waiter that cannot be
placed does not stop the walk, because a later waiter may want another replica (a bound
connection waits for its own replica only) or belong to a tenant below its running limit; an
unconstrained waiter can use any free slot, so one that cannot be placed means no later
unconstrained waiter of a tenant below its limit can be either: order is kept and nobody
starves. Limits: at most `max_queue` waiters, at most `max_per_tenant` of one tenant (0: no
such limit), each at most `timeout` seconds. Pure: time comes in as arguments; no I/O.
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
    tenant: str = ""  # whose build it is: fairness and per-tenant limits
    tag: int = field(default=0)  # fair-queueing start tag (set by `offer`)


class AdmissionQueue:
    def __init__(self, *, max_queue: int, timeout: float, max_per_tenant: int = 0) -> None:
        self.max_queue = max_queue
        self.timeout = timeout
        self.max_per_tenant = max_per_tenant
        self._waiters: dict[int, Waiter] = {}  # kept in (tag, ticket) order
        self._next_ticket = 1
        self._vtime = 0  # the tag of the last waiter admitted
        self._last_tag: dict[str, int] = {}  # tenant -> tag of its last waiter offered
        self._per_tenant: dict[str, int] = {}  # tenant -> waiters queued

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self._waiters.values()))

    def queued_by(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def offer(self, waiter: Waiter, now: float) -> bool:
        """Queues the waiter (stamping ticket, tag and deadline); False when the queue, or
        the tenant's share of it, is full."""
        if len(self._waiters) >= self.max_queue:
            return False
        if self.max_per_tenant and self.queued_by(waiter.tenant) >= self.max_per_tenant:
            return False
        waiter.ticket = self._next_ticket
        self._next_ticket += 1
        waiter.enqueued = now
        waiter.deadline = now + self.timeout
        waiter.tag = max(self._vtime, self._last_tag.get(waiter.tenant, 0)) + 1
        self._last_tag[waiter.tenant] = waiter.tag
        self._per_tenant[waiter.tenant] = self.queued_by(waiter.tenant) + 1
        self._waiters[waiter.ticket] = waiter
        if len(self._last_tag) > 1:  # keep (tag, ticket) order; one tenant: FIFO already
            self._waiters = dict(sorted(self._waiters.items(),
                                        key=lambda kv: (kv[1].tag, kv[0])))
        return True

    def _gone(self, waiter: Waiter) -> None:
        left = self._per_tenant[waiter.tenant] - 1
        if left:
            self._per_tenant[waiter.tenant] = left
        else:
            del self._per_tenant[waiter.tenant]

    def remove(self, ticket: int) -> Waiter | None:
        waiter = self._waiters.pop(ticket, None)
        if waiter is not None:
            self._gone(waiter)
        return waiter

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
        for waiter in waiting:
            del self._waiters[waiter.ticket]
            replica = place(waiter)
            if replica is None:
                self._waiters[waiter.ticket] = waiter
            else:
                placed.append((waiter, replica))
                self._gone(waiter)
                self._vtime = max(self._vtime, waiter.tag)
        self._waiters = dict(sorted(self._waiters.items(), key=lambda kv: (kv[1].tag, kv[0])))
        # A tenant whose last tag the virtual time has passed has no head start left to keep.
        self._last_tag = {t: tag for t, tag in self._last_tag.items()
                          if tag > self._vtime or t in self._per_tenant}
        return placed

    def expire(self, now: float) -> list[Waiter]:
        gone = [w for w in self._waiters.values() if w.deadline <= now]
        for w in gone:
            del self._waiters[w.ticket]
            self._gone(w)
        return gone

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._waiters.values()), default=None)
