"""The replica registry: what the pool looks like right now.

Design: readers get an immutable `Snapshot` (frozen dataclasses) that the registry swaps in one
assignment; discovery, health checking and the scaler are the only writers, each of its own
fields: discovery owns membership, `address`, `pod_ready`, `terminating` and `victim`
(`sync_pool`); the prober owns `ready`, `ejected` and `reason`; the scaler owns `draining` and
`leaving`. Every
change bumps `version` and calls the listeners once; what is derived from the replicas is
brought up to the new version by its owner (the hub makes a pool's hash ring in bounded steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Replica:
    id: str  # stable name: "host:port" for static replicas, the pod name for discovered ones
    address: str  # "tcp://host:port" or "unix:///path"
    pool: str = "default"
    ready: bool = False  # last probe succeeded and not ejected
    draining: bool = False  # a scale-down victim: takes no new builds but bound ones
    leaving: bool = False  # a victim whose removal was asked for: takes nothing new at all
    ejected: bool = False  # taken out after a connect failure or lost connection (backoff)
    reason: str = "not probed yet"  # why not ready
    pod_ready: bool = True  # discovery: the pod's Ready condition (static replicas: True)
    terminating: bool = False  # discovery: the pod has a deletionTimestamp
    victim: bool = False  # discovery: the pod carries the scale-down victim's deletion cost
    #                       (set by whichever gateway scales): like draining, on every gateway

    @property
    def serving(self) -> bool:
        """Up and staying: ready, not ejected, its pod Ready and not terminating, not leaving."""
        return (self.ready and not self.ejected and self.pod_ready and not self.terminating
                and not self.leaving)

    @property
    def placeable(self) -> bool:
        return self.serving and not self.draining and not self.victim


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

    def sync_pool(self, pool: str, members: Iterable[Replica]) -> None:
        """Discovery's view of a pool: its replicas now, by id.

        Replicas that stay (same id and address) keep what the prober and the scaler set
        (ready, ejected, reason, draining, leaving); new ones start unprobed; those absent
        leave.
        """
        current = self.snapshot.by_id
        kept = tuple(r for r in self.snapshot.replicas if r.pool != pool)
        merged = []
        for new in members:
            old = current.get(new.id)
            if old is not None and old.pool == pool and old.address == new.address:
                new = replace(old, pod_ready=new.pod_ready, terminating=new.terminating,
                              victim=new.victim)
            merged.append(new)
        items = kept + tuple(merged)
        if items != self.snapshot.replicas:
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
