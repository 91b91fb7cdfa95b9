"""The build ledger: which builds run where, and how they ended.

Design: the relay reports a build when its Solve is placed and when the Solve stream ends; the
ledger keeps active builds keyed by (Ref, replica) (multi-node buildx builders reuse one Ref on
several replicas), per-replica counts of active non-internal builds (the load that placement and
admission read), a bounded record of finished builds, and a bounded Ref -> replica map of
finished builds for history calls. Pure: time is passed in; no I/O, no clock reads.
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
    def __init__(self, *, keep_finished: int = 1000, keep_owners: int = 100_000) -> None:
        self._active: dict[tuple[str, str], BuildRecord] = {}
        self._loads: dict[str, int] = {}
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
            self._loads[replica] = self._loads.get(replica, 0) + 1
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
            self._loads[replica] -= 1
            if not self._loads[replica]:
                del self._loads[replica]
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
