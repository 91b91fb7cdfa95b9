"""The build ledger: which builds run where, and how they ended.

Design: the relay reports a build when its Solve is placed and when the Solve stream ends; the
ledger keeps active builds keyed by (Ref, replica) (multi-node buildx builders reuse one Ref on
several replicas), per-replica counts of active non-internal builds (the load that placement and
admission read), a bounded record of finished builds, and a bounded Ref -> replica map of
finished builds for history calls. Pure: time is passed in; no I/O, no clock reads.

Tallies: placement needs, per pool, how many replicas are below the slot limit and how many
builds they run, at every pick. `tally(replicas, limit=)` answers from running totals that
`start` and `finish` keep for the last `keep_tallies` (replica set, limit) pairs asked about:
O(1) per ask, O(keep_tallies) per start or finish; a pair asked about for the first time (the
pool's placeable set changed) is counted once from the loads, O(replicas with builds). The hub
asks two pairs per pool (its placeable replicas with the slot limit, and without for internal
builds).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class BuildRecord:
    ref: str
    replica: str
    internal: bool
    started: float
    finished: float | None = None
    result: str | None = None  # "ok", a gRPC code name, "cancelled", "replica-lost"

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


class Ledger:
    def __init__(self, *, keep_finished: int = 1000, keep_owners: int = 100_000,
                 keep_tallies: int = 32) -> None:
        self._active: dict[tuple[str, str], BuildRecord] = {}
        self._loads: dict[str, int] = {}
        # (replica set, limit) -> [open replicas, builds on them], least recently asked first
        self._tallies: OrderedDict[tuple[frozenset[str], int], list[int]] = OrderedDict()
        self._keep_tallies = keep_tallies
        self._running: dict[str, set[str]] = {}  # Ref -> replicas running it
        self._finished: deque[BuildRecord] = deque(maxlen=keep_finished)
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._keep_owners = keep_owners

    def start(self, ref: str, replica: str, *, internal: bool, now: float) -> bool:
        """Records a build; False (and nothing recorded) if the Ref already runs there."""
        key = (ref, replica)
        if key in self._active:
            return False
        self._active[key] = BuildRecord(ref, replica, internal, now)
        self._running.setdefault(ref, set()).add(replica)
        if not internal:
            load = self._loads.get(replica, 0)
            self._loads[replica] = load + 1
            self._retally(replica, load, load + 1)
        return True

    def finish(self, ref: str, replica: str, *, result: str, now: float) -> BuildRecord | None:
        record = self._active.pop((ref, replica), None)
        if record is None:
            return None
        running = self._running.get(ref)
        if running is not None:
            running.discard(replica)
            if not running:
                del self._running[ref]
        if not record.internal:
            load = self._loads[replica]
            if load > 1:
                self._loads[replica] = load - 1
            else:
                del self._loads[replica]
            self._retally(replica, load, load - 1)
            self.learn_owner(ref, replica)
        done = replace(record, finished=now, result=result)
        self._finished.append(done)
        return done

    def learn_owner(self, ref: str, replica: str) -> None:
        """Records where a finished build ran, learned from the replicas' own history."""
        self._owners[ref] = replica
        self._owners.move_to_end(ref)
        while len(self._owners) > self._keep_owners:
            self._owners.popitem(last=False)

    def loads(self) -> dict[str, int]:
        """Active non-internal builds per replica (replicas with none are absent)."""
        return self._loads

    def tally(self, replicas: frozenset[str], *, limit: int = 0) -> tuple[int, int]:
        """(open replicas, builds they run): the `replicas` with fewer than `limit` active
        non-internal builds (all of them with limit 0), and the sum of their loads.

        Pass the same frozenset object each time (a ring's `members`): it is the key of the
        running totals, and hashing a frozenset is free after the first time."""
        key = (replicas, limit)
        counts = self._tallies.get(key)
        if counts is None:
            counts = self._count(replicas, limit)
            self._tallies[key] = counts
            if len(self._tallies) > self._keep_tallies:
                self._tallies.popitem(last=False)
        else:
            self._tallies.move_to_end(key)
        return counts[0], counts[1]

    def _count(self, replicas: frozenset[str], limit: int) -> list[int]:
        count, load = len(replicas), 0
        for replica, builds in self._loads.items():
            if replica in replicas:
                if limit and builds >= limit:
                    count -= 1
                else:
                    load += builds
        return [count, load]

    def _retally(self, replica: str, before: int, after: int) -> None:
        """A replica's load went from `before` to `after`: each kept tally containing it
        moves it between open and full, or changes its open load."""
        for (replicas, limit), counts in self._tallies.items():
            if replica in replicas:
                was_open = not limit or before < limit
                is_open = not limit or after < limit
                counts[0] += is_open - was_open
                counts[1] += (after if is_open else 0) - (before if was_open else 0)

    def running_on(self, ref: str) -> frozenset[str]:
        return frozenset(self._running.get(ref, ()))

    def owner(self, ref: str) -> str | None:
        """The replica that ran a finished non-internal build, unless the Ref runs again."""
        if ref in self._running:
            return None
        return self._owners.get(ref)

    def active(self) -> Iterator[BuildRecord]:
        return iter(self._active.values())

    def finished(self) -> Iterator[BuildRecord]:
        return iter(self._finished)
