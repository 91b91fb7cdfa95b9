"""Consistent hash ring with virtual nodes.

Design: each node owns `vnodes` points on a 64-bit ring (BLAKE2b of "<node>#<i>"); a key hashes
to a point and walks clockwise. `walk(key)` yields the distinct nodes in ring order, so bounded
loads can skip a busy node for the next one. The ring is immutable and a pure function of the
node set: gateways that see the same replicas route identically. Adding one node to N moves about
1/(N+1) of the keys, all of them to the new node.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable


def _point(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class HashRing:
    __slots__ = ("_nodes", "_owners", "_points")

    def __init__(self, nodes: Iterable[str], *, vnodes: int = 160) -> None:
        self._nodes = tuple(sorted(set(nodes)))
        pairs = sorted((_point(f"{n}#{i}"), n) for n in self._nodes for i in range(vnodes))
        self._points = [p for p, _ in pairs]
        self._owners = [n for _, n in pairs]

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    def walk(self, key: str) -> list[str]:
        """Every node once, in ring order starting at the key's position."""
        if not self._nodes:
            return []
        start = bisect.bisect(self._points, _point(key))
        seen: dict[str, None] = {}
        owners = self._owners
        count = len(owners)
        for i in range(count):
            node = owners[(start + i) % count]
            if node not in seen:
                seen[node] = None
                if len(seen) == len(self._nodes):
                    break
        return list(seen)

    def lookup(self, key: str) -> str | None:
        order = self.walk(key)
        return order[0] if order else None
