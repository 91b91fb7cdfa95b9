"""Consistent hash ring with virtual nodes.

Design: each node owns `vnodes` points on a 64-bit ring (BLAKE2b of "<node>#<i>"); a key hashes
to a point and walks clockwise. `walk(key)` yields the distinct nodes in ring order, lazily, so
bounded loads can skip a busy node for the next one and stop at the first it takes. The ring is
immutable and a pure function of the node set: gateways that see the same replicas route
identically. Adding one node to N moves about 1/(N+1) of the keys, all of them to the new node.

Layout: two parallel arrays sorted by (point, owner name): `_points` ('Q') and `_owners` ('I',
slots into `_names`). Equal points (a 64-bit collision) are ordered by owner name, so the
order is the node set's, whatever the history. Slots are internal: a removed node leaves a hole
that a later node may take, no owner refers to a hole, and no walk shows a slot.

Cost: a node's points depend only on its name and are memoized (the last `MEMO_NODES` nodes), so
a rebuild hashes only nodes it has not seen. `with_nodes` derives the ring of a changed node set
from this one: when few nodes changed it bisects their points into place and copies the arrays
around them in slices (a memcpy each), O(changed x vnodes x log points + points) with a tiny
constant; otherwise (and in `HashRing(...)`) it sorts every point, O(points x log nodes). `walk`
costs a hash and a bisect, then one step per point it passes.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import operator
from array import array
from collections.abc import Collection, Iterable, Iterator

MEMO_NODES = 4096  # nodes whose points are memoized (1.25 KiB each at 160 vnodes)


def _point(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=MEMO_NODES)
def _vnode_bytes(node: str, vnodes: int) -> bytes:
    """The node's points, sorted, as the bytes of an array('Q'): immutable, so memoizable."""
    return array("Q", sorted(_point(f"{node}#{i}") for i in range(vnodes))).tobytes()


def _vnode_points(node: str, vnodes: int) -> array[int]:
    points = array("Q")
    points.frombytes(_vnode_bytes(node, vnodes))
    return points


class HashRing:
    __slots__ = ("_members", "_names", "_nodes", "_owners", "_points", "_slots", "_vnodes")

    def __init__(self, nodes: Iterable[str], *, vnodes: int = 160) -> None:
        """Every point of every node, sorted: stable, so equal points stay in name order."""
        names = tuple(sorted(set(nodes)))
        packed = array("Q")
        for node in names:
            packed.frombytes(_vnode_bytes(node, vnodes))
        unsorted = packed.tolist()  # a list's items are read faster than an array's
        order = sorted(range(len(unsorted)), key=unsorted.__getitem__)
        self._set(names, vnodes=vnodes, names=names,
                  slots={name: slot for slot, name in enumerate(names)},
                  points=array("Q", map(unsorted.__getitem__, order)),
                  owners=array("I", map(operator.floordiv, order, itertools.repeat(vnodes))))

    def _set(self, nodes: tuple[str, ...], *, vnodes: int, names: tuple[str, ...],
             slots: dict[str, int], points: array[int], owners: array[int]) -> None:
        self._nodes = nodes
        self._members = frozenset(nodes)
        self._vnodes = vnodes
        self._names = names  # slot -> name; a hole keeps the name of the node that left it
        self._slots = slots  # name -> slot, for the nodes only: what tells holes apart
        self._points = points
        self._owners = owners

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes, sorted by name."""
        return self._nodes

    def with_nodes(self, nodes: Iterable[str]) -> HashRing:
        """The ring of `nodes`: equal to HashRing(nodes, vnodes=<this ring's>), derived from
        this one. The same node set gives this very ring; up to a quarter of the new set
        changed (added plus removed) is spliced in; more is a full build."""
        wanted = frozenset(nodes)
        if wanted == self._members:
            return self
        added = wanted - self._members
        removed = self._members - wanted
        if len(added) + len(removed) > len(wanted) // 4:
            return HashRing(wanted, vnodes=self._vnodes)
        return self._spliced(wanted, added=added, removed=removed)

    def _spliced(self, wanted: frozenset[str], *, added: Collection[str],
                 removed: Collection[str]) -> HashRing:
        """Removes `removed`'s points and inserts `added`'s, copying the arrays in slices
        between the edits. An edit is (index in the old arrays, 0 insert before it / 1 delete
        it, point, owner name, slot); sorted, inserts into one gap come in (point, name)
        order and an insert before a deleted entry comes before its deletion."""
        names, slots = list(self._names), dict(self._slots)
        edits: list[tuple[int, int, int, str, int]] = []
        for node in removed:
            slot = slots.pop(node)
            theirs = _vnode_points(node, self._vnodes)
            edits.extend((i, 1, p, node, slot)
                         for i, p in zip(self._indexes_of(theirs, slot), theirs, strict=True))
        used = set(slots.values())
        holes = (slot for slot in range(len(names)) if slot not in used)
        for node in sorted(added):
            slot = next(holes, len(names))
            if slot == len(names):
                names.append(node)
            else:
                names[slot] = node
            slots[node] = slot
            edits.extend((self._gap_for(p, node), 0, p, node, slot)
                         for p in _vnode_points(node, self._vnodes))
        points, owners = array("Q"), array("I")
        start = 0
        for index, delete, point, _, slot in sorted(edits):
            points += self._points[start:index]
            owners += self._owners[start:index]
            if delete:
                start = index + 1
            else:
                points.append(point)
                owners.append(slot)
                start = index
        points += self._points[start:]
        owners += self._owners[start:]
        ring = HashRing.__new__(HashRing)
        ring._set(tuple(sorted(wanted)), vnodes=self._vnodes, names=tuple(names), slots=slots,
                  points=points, owners=owners)
        return ring

    def _indexes_of(self, points: Iterable[int], slot: int) -> Iterator[int]:
        """Where `slot`'s sorted `points` are: among equal points, the entries it owns, a
        point it has twice being its next entry."""
        i, previous = -1, None
        for point in points:
            i = i + 1 if point == previous else bisect.bisect_left(self._points, point)
            while self._owners[i] != slot:
                i += 1
            previous = point
            yield i

    def _gap_for(self, point: int, node: str) -> int:
        """The index `node`'s `point` goes before: after equal points of lower names."""
        i = bisect.bisect_left(self._points, point)
        count = len(self._points)
        while (i < count and self._points[i] == point
               and self._names[self._owners[i]] < node):
            i += 1
        return i

    def walk(self, key: str) -> Iterator[str]:
        """Every node once, in ring order from the key's position; lazy: a caller that stops
        early pays only for the points it passed."""
        owners, names = self._owners, self._names
        count = len(owners)
        if not count:
            return
        start = bisect.bisect(self._points, _point(key))
        total = len(self._nodes)
        seen: set[int] = set()
        for i in itertools.chain(range(start, count), range(start)):
            slot = owners[i]
            if slot not in seen:
                seen.add(slot)
                yield names[slot]
                if len(seen) == total:
                    return

    def lookup(self, key: str) -> str | None:
        return next(self.walk(key), None)
