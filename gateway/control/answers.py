"""Answers to the global calls from the replicas' cached answers, ready for the relay to send.

Design: ListWorkers, Info and grpc.health.v1 Check need no replica round trip: ListWorkers is
the concatenation of the pool's replicas' cached responses (protobuf merges repeated field 1,
so this is the union of worker records), Info one replica's cached answer (ready replicas
first), Check SERVING while a replica of the pool takes builds. The relay answers them itself
with these gRPC-framed bytes (`CachedCalls.answer`), which costs a dict lookup instead of a
trip through grpcio (about 0.9 ms of CPU per call). Answers are memoized per (pool, path) and
keyed by the registry snapshot's version and the cache's version, both bumped on every change,
so they are rebuilt only after a replica or its answers changed.

A pool that no replica has answered for has no cached answer: `answer` returns None and the
control server takes the call (it may wait for a first answer of a pool scaled from zero, and
counts as demand meanwhile), as do every other control call (fan-outs, history, Watch).
"""

from __future__ import annotations

from gateway.buildkit.wire import frame_message
from gateway.control.probe import INFO, LIST_WORKERS, CachedAnswers, ReplicaCache
from gateway.replicas.registry import Registry

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"
NOT_SERVING = b"\x08\x02"


def pool_answers(registry: Registry, cache: ReplicaCache, pool: str) -> list[CachedAnswers]:
    """The pool's replicas' cached answers, ready replicas first; else the pool's last ones;
    else none."""
    replicas = [r for r in registry.snapshot.replicas
                if r.pool == pool and r.id in cache.answers]
    answers = [cache.answers[r.id] for r in sorted(replicas, key=lambda r: not r.placeable)]
    if answers:
        return answers
    last = cache.last_of_pool.get(pool)
    return [last] if last is not None else []


def health(registry: Registry, pool: str) -> bytes:
    """A grpc.health.v1 HealthCheckResponse: SERVING while a replica of the pool is ready."""
    serving = any(r.placeable for r in registry.snapshot.replicas if r.pool == pool)
    return SERVING if serving else NOT_SERVING


class CachedCalls:
    """What the relay answers itself: `answer(pool, path)` -> a gRPC-framed response message,
    or None (the control server takes the call)."""

    PATHS = frozenset((LIST_WORKERS, INFO, HEALTH_CHECK))

    def __init__(self, registry: Registry, cache: ReplicaCache) -> None:
        self.registry = registry
        self.cache = cache
        self._memo: dict[tuple[str, str], bytes | None] = {}
        self._versions = (-1, -1)

    def answer(self, pool: str, path: str) -> bytes | None:
        if path not in self.PATHS:
            return None
        versions = (self.registry.snapshot.version, self.cache.version)
        if versions != self._versions:
            self._memo.clear()
            self._versions = versions
        key = (pool, path)
        try:
            return self._memo[key]
        except KeyError:
            framed = self._memo[key] = self._build(pool, path)
            return framed

    def _build(self, pool: str, path: str) -> bytes | None:
        if path == HEALTH_CHECK:
            return frame_message(health(self.registry, pool))
        answers = pool_answers(self.registry, self.cache, pool)
        if not answers:
            return None
        if path == LIST_WORKERS:
            return frame_message(b"".join(a.list_workers for a in answers))
        return frame_message(answers[0].info)
