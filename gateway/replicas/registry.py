"""The replica registry: what the pool looks like right now.

Design: readers get an immutable `Snapshot` (frozen dataclasses) that the registry swaps in one
assignment; discovery and health checking are the only writers. Every change bumps `version` and
calls the listeners once, so caches keyed by the version (the hash ring) rebuild lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Replica:
    id: str  # stable name: "host:port" for static replicas
    address: str  # "tcp://host:port" or "unix:///path"
    pool: str = "default"
    ready: bool = False  # last probe succeeded and not ejected
    draining: bool = False  # takes no new builds (terminating, scale-down victim)
    ejected: bool = False  # taken out after a connect failure or lost connection (backoff)
    reason: str = "not probed yet"  # why not ready

    @property
    def placeable(self) -> bool:
        return self.ready and not self.draining and not self.ejected


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int = 0
    replicas: tuple[Replica, ...] = ()
    by_id: dict[str, Replica] = field(default_factory=dict)

    def placeable(self, pool: str = "default") -> tuple[str, ...]:
        return tuple(r.id for r in self.replicas if r.pool == pool and r.placeable)


class Registry:
    def __init__(self, replicas: Iterable[Replica] = ()) -> None:
        self.snapshot = Snapshot()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self.replace_all(replicas)

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        self._listeners.append(listener)

    def replace_all(self, replicas: Iterable[Replica]) -> None:
        items = tuple(replicas)
        self._swap(items)

    def update(self, replica_id: str, **changes: object) -> None:
        current = self.snapshot.by_id.get(replica_id)
        if current is None:
            return
        updated = replace(current, **changes)  # type: ignore[arg-type]
        if updated == current:
            return
        self._swap(tuple(updated if r.id == replica_id else r for r in self.snapshot.replicas))

    def _swap(self, items: tuple[Replica, ...]) -> None:
        self.snapshot = Snapshot(self.snapshot.version + 1, items, {r.id: r for r in items})
        for listener in self._listeners:
            listener(self.snapshot)
