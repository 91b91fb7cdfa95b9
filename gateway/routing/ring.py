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

Making a ring: `HashRing(nodes)` is a full build; `with_nodes` derives the ring of a changed
node set from this one: the same set gives this very ring, up to a quarter of the new set
changed (added plus removed) is spliced in (each changed node's points bisected into place, the
arrays copied around them in slices, a memcpy each) when that is estimated cheaper than a full
build, more is a full build. A full build cuts
the ring into arcs of at most about ARC_POINTS points by the points' top bits, sorts each arc
on its own (a stable sort of points taken in name order: equal points stay in name order) and
appends it. Every path gives the same arrays (the unit tests compare them).

Steps: `steps_to(nodes)` makes the same ring in steps of bounded work and yields between them,
so that an event loop runs in between (relay/hub.py): a full build yields between nodes put
into their arcs and between arcs sorted, a splice between batches of nodes. Work is counted in
the estimated costs below (ns per point, fitted at 1,000 nodes; bench/picks.py measures the
real steps). A step ends once it has spent its budget, so it overshoots it by at most one unit:
one node's points or one arc; a splice batch is sized to fit (one node at least, with the copy
of the whole arrays that every batch makes).

Cost: a node's points depend only on its name and are memoized (the last MEMO_NODES nodes), so
a build hashes only nodes it has not seen. A splice costs O(changed x vnodes x log points +
points) with a tiny constant, a full build O(points x log ARC_POINTS). `walk` costs a hash and
a bisect, then one step per point it passes.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import operator
from array import array
from collections.abc import Collection, Generator, Iterable, Iterator

MEMO_NODES = 4096  # nodes whose points are memoized (1.25 KiB each at 160 vnodes)
ARC_POINTS = 4096  # a full build sorts arcs of at most about this many points, one at a time
STEP_NS = 2_500_000  # the estimated work of one step of steps_to
# Estimated costs, ns per point:
HASH_NS = 700  # hashing a point of a node not memoized
SCAN_NS = 80  # full build: reading a point and putting it into its arc
SORT_NS = 230  # full build: sorting a point into the arrays
SPLICE_NS = 1100  # splice: finding the place of a changed node's point, moving it
COPY_NS = 3  # splice: copying a point of the ring around the edits

Steps = Generator[None, None, "HashRing"]

_memo: dict[tuple[str, int], bytes] = {}  # (node, vnodes) -> points; least recently used first


def _point(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


def _vnode_bytes(node: str, vnodes: int) -> bytes:
    """The node's points, sorted, as the bytes of an array('Q'): immutable, so memoized."""
    key = (node, vnodes)
    points = _memo.pop(key, None)
    if points is None:
        points = array("Q", sorted(_point(f"{node}#{i}") for i in range(vnodes))).tobytes()
        if len(_memo) >= MEMO_NODES:
            del _memo[next(iter(_memo))]
    _memo[key] = points
    return points


def _vnode_points(node: str, vnodes: int) -> array[int]:
    points = array("Q")
    points.frombytes(_vnode_bytes(node, vnodes))
    return points


def _cost(node: str, vnodes: int, ns_per_point: int) -> int:
    """The estimated work on `node`'s points, hashing them first if they are not memoized."""
    return vnodes * (ns_per_point + (0 if (node, vnodes) in _memo else HASH_NS))


def _finish(steps: Steps) -> HashRing:
    """Runs `steps` to the end: the ring they make."""
    while True:
        try:
            next(steps)
        except StopIteration as made:
            ring: HashRing = made.value
            return ring


class HashRing:
    __slots__ = ("_members", "_names", "_nodes", "_owners", "_points", "_slots", "_vnodes")

    def __init__(self, nodes: Iterable[str], *, vnodes: int = 160) -> None:
        """The full build, in one go."""
        for _ in self._build(frozenset(nodes), vnodes=vnodes, budget=math.inf):
            pass

    def _build(self, wanted: frozenset[str], *, vnodes: int,
               budget: float) -> Generator[None, None, None]:
        """Makes this ring the ring of `wanted`: every point into its arc, node after node in
        name order, then each arc sorted and appended. Yields each time it has spent
        `budget`."""
        names = tuple(sorted(wanted))
        bits = (len(names) * vnodes // ARC_POINTS).bit_length()  # 2**bits arcs
        shift = 64 - bits
        values: list[int] = []  # every point, node after node (a list reads faster)
        arcs: list[list[int]] = [[] for _ in range(1 << bits)]  # indexes into `values`
        spent = 0
        for node in names:
            spent += _cost(node, vnodes, SCAN_NS)
            start = len(values)
            values += _vnode_points(node, vnodes).tolist()
            for i in range(start, len(values)):
                arcs[values[i] >> shift].append(i)
            if spent >= budget:
                yield
                spent = 0
        points, owners = array("Q"), array("I")
        for arc in arcs:
            order = sorted(arc, key=values.__getitem__)
            points.extend(map(values.__getitem__, order))
            owners.extend(map(operator.floordiv, order, itertools.repeat(vnodes)))
            spent += len(arc) * SORT_NS
            if spent >= budget:
                yield
                spent = 0
        self._set(names, vnodes=vnodes, names=names,
                  slots={name: slot for slot, name in enumerate(names)},
                  points=points, owners=owners)

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

    @property
    def members(self) -> frozenset[str]:
        """The nodes, as a set."""
        return self._members

    def with_nodes(self, nodes: Iterable[str]) -> HashRing:
        """The ring of `nodes`: equal to HashRing(nodes, vnodes=<this ring's>), derived from
        this one in one go (steps_to without a budget)."""
        return _finish(self.steps_to(nodes, budget=math.inf))

    def steps_to(self, nodes: Iterable[str], *, budget: float = STEP_NS) -> Steps:
        """The ring of `nodes`, as with_nodes, made in steps: yields each time it has spent
        `budget` (estimated ns), returns the ring. The same node set gives this very ring; up
        to a quarter of the new set changed (added plus removed) is spliced in, in batches that
        fit the budget (leavers first, each batch a ring of its own), unless that is estimated
        to cost more than a full build (each batch copies the whole arrays: many batches over
        thousands of nodes); otherwise a full build."""
        wanted = frozenset(nodes)
        if wanted == self._members:
            return self
        added = wanted - self._members
        removed = self._members - wanted
        vnodes = self._vnodes
        copy = max(len(wanted), len(self._members)) * vnodes * COPY_NS
        if len(added) + len(removed) <= len(wanted) // 4:
            edits = sum(_cost(node, vnodes, SPLICE_NS) for node in (*added, *removed))
            room = budget - copy
            batches = (1 if room == math.inf
                       else len(added) + len(removed) if room <= 0
                       else min(math.ceil(edits / room), len(added) + len(removed)))
            cost = edits + batches * copy
            # A full build costs at least its scan and sort; its hashing (the nodes not
            # memoized, a pass over the whole set) is counted only when that decides.
            full = len(wanted) * vnodes * (SCAN_NS + SORT_NS)
            splice = cost <= full or cost <= full + sum(
                vnodes * HASH_NS for node in wanted if (node, vnodes) not in _memo)
        else:
            splice = False
        if not splice:
            ring = HashRing.__new__(HashRing)
            yield from ring._build(wanted, vnodes=vnodes, budget=budget)
            return ring
        ring, spent = self, copy
        batch: list[str] = []
        for node in [*sorted(removed), *sorted(added)]:
            cost = _cost(node, self._vnodes, SPLICE_NS)
            if batch and spent + cost > budget:
                ring = ring._spliced(batch)
                yield
                batch, spent = [], copy
            batch.append(node)
            spent += cost
        return ring._spliced(batch)

    def _spliced(self, changed: Collection[str]) -> HashRing:
        """This ring with the nodes of `changed` toggled: those in it leave, the others join.
        Removes the leavers' points and inserts the joiners', copying the arrays in slices
        between the edits. An edit is (index in the old arrays, 0 insert before it / 1 delete
        it, point, owner name, slot); sorted, inserts into one gap come in (point, name)
        order and an insert before a deleted entry comes before its deletion."""
        names, slots = list(self._names), dict(self._slots)
        edits: list[tuple[int, int, int, str, int]] = []
        for node in [node for node in changed if node in slots]:
            slot = slots.pop(node)
            theirs = _vnode_points(node, self._vnodes)
            edits.extend((i, 1, p, node, slot)
                         for i, p in zip(self._indexes_of(theirs, slot), theirs, strict=True))
        used = set(slots.values())
        holes = (slot for slot in range(len(names)) if slot not in used)
        for node in sorted(node for node in changed if node not in self._slots):
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
        ring._set(tuple(sorted(slots)), vnodes=self._vnodes, names=tuple(names), slots=slots,
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
