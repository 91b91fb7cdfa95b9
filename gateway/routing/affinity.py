"""Cache affinity: which replica last ran each sticky key (pure).

Design: a warm cache is worth more than the ring's ideal spread. The ring moves about 1/(N+1) of
the keys on every scale event (and a scale-down and back up moves them again); a key whose
layers live on a replica should go back there while that replica is placeable and its load is
within the bound. So the gateway remembers, per sticky key, the replica its last build was
placed on, in a bounded LRU (`Memory`), and the sticky pick tries that replica before walking
the ring (relay/hub.py). A key never seen, or whose replica is gone or too loaded, walks the
ring as before; the build's placement then becomes the key's memory.

Keys are stored as short digests of (pool, key): the memory is published to the other gateways
(scaling/lease.py puts `recent` entries in the gateway's own Lease and `merge`s the others'),
and a digest keeps that small and keeps the repositories' paths out of the Kubernetes API.
Entries carry the Unix time of their build so that merging keeps the newer one; clocks that
differ by seconds between nodes only matter for a key built on two gateways within seconds.

Invariants: at most `capacity` entries; `remember` and `merge` are O(1) per entry; nothing here
reads a clock or does I/O (time comes in as `now`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


def digest(pool: str, key: str) -> str:
    """A short stable name of a pool's sticky key (16 hex digits)."""
    return hashlib.blake2b(f"{pool}\0{key}".encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    digest: str
    replica: str
    at: float  # Unix time of the build that placed it


class Memory:
    """The replica that last ran each key, most recent last, at most `capacity` (0: off)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.version = 0  # changes with every entry set (what the publisher compares)

    def __len__(self) -> int:
        return len(self._entries)

    def last(self, digest: str) -> str | None:
        entry = self._entries.get(digest)
        return None if entry is None else entry.replica

    def remember(self, digest: str, replica: str, *, now: float) -> None:
        self._set(Entry(digest, replica, now))

    def merge(self, entries: Iterable[Entry]) -> int:
        """Adds the entries newer than what this memory holds for their key (another gateway's
        builds); returns how many it took."""
        taken = 0
        for entry in sorted(entries, key=lambda e: e.at):
            mine = self._entries.get(entry.digest)
            if mine is None or mine.at < entry.at:
                taken += self._set(entry)
        return taken

    def recent(self, count: int) -> list[Entry]:
        """The `count` most recent entries, oldest first."""
        if count <= 0:
            return []
        out: list[Entry] = []
        for d in reversed(self._entries):
            out.append(self._entries[d])
            if len(out) == count:
                break
        out.reverse()
        return out

    def _set(self, entry: Entry) -> int:
        if not self.capacity:
            return 0
        mine = self._entries.get(entry.digest)
        if mine == entry:
            return 0
        self._entries[entry.digest] = entry
        self._entries.move_to_end(entry.digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        self.version += 1
        return 1


def encode(entries: Iterable[Entry]) -> list[list[object]]:
    """Entries as JSON-ready rows: [digest, replica, at (whole seconds)]."""
    return [[e.digest, e.replica, int(e.at)] for e in entries]


def decode(rows: object) -> list[Entry]:
    """A peer's rows; what does not parse is skipped (a peer's bug must not stop routing)."""
    out: list[Entry] = []
    if not isinstance(rows, list):
        return out
    for row in rows:
        if (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and isinstance(row[1], str) and isinstance(row[2], (int, float))
                and not isinstance(row[2], bool)):
            out.append(Entry(row[0], row[1], float(row[2])))
    return out
