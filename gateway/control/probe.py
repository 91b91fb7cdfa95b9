"""Active probes of every replica; they also refresh the caches the control server answers from.

Design: one task loops over the registry's replicas every `interval`, probing all of them
concurrently with `Control/ListWorkers` and `Control/Info` (each bounded by `timeout`). Success
marks the replica ready and stores both raw responses in `ReplicaCache`; failure marks it not
ready with the reason. Transitions are logged once each, so an unreachable replica is reported
clearly without flooding the log, and it is never fatal. The cache keeps each pool's last
answers after its replicas stop or leave (a pool scaled to zero), so global calls are still
answered with every replica down; a replica's own answers go when it leaves the registry.

A replica that joins, or whose pod turns Ready, is probed at once in a task of its own (not at
the next round, which a slow replica's timeout can hold up), so a build waiting for it is
dispatched within milliseconds of readiness.

A replica can vanish without closing its connections (node lost, process frozen): its builds
would then wait for it forever. The prober keeps, per replica, when the current streak of failed
probes began (its first failure seen; any answer ends the streak). Once the streak has lasted
`dead_after` while builds run on the replica (`is_dead`, pure), `on_dead` ends every call open on
it with UNAVAILABLE naming it and why (the hub drops its connections as if lost) and the replica
is ejected. The decision is taken at each failed probe, so it comes at most one probe round
(interval + timeout) after `dead_after`; a replica that answers before then loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.builds.ledger import Ledger
from gateway.config import ProbeSettings
from gateway.control.channels import Channels
from gateway.metrics import Metrics
from gateway.replicas.health import Ejections
from gateway.replicas.registry import Registry, Replica, Snapshot

log = logging.getLogger("gateway.probe")

LIST_WORKERS = "/moby.buildkit.v1.Control/ListWorkers"
INFO = "/moby.buildkit.v1.Control/Info"


@dataclass(frozen=True, slots=True)
class CachedAnswers:
    list_workers: bytes  # raw ListWorkersResponse
    info: bytes  # raw InfoResponse


class ReplicaCache:
    """Last answers of each replica to the global calls, by replica id, and of each pool."""

    def __init__(self) -> None:
        self.answers: dict[str, CachedAnswers] = {}
        self.last_of_pool: dict[str, CachedAnswers] = {}
        self.version = 0  # bumped by every change (readers memoize on it)
        self._stored = asyncio.Event()

    def store(self, replica: Replica, answers: CachedAnswers) -> None:
        if (self.answers.get(replica.id) != answers
                or self.last_of_pool.get(replica.pool) != answers):
            self.version += 1
        self.answers[replica.id] = answers
        self.last_of_pool[replica.pool] = answers
        self._stored.set()
        self._stored = asyncio.Event()

    def retain(self, ids: Iterable[str]) -> None:
        """Forgets the answers of replicas that left (their pool's last answers stay)."""
        keep = set(ids)
        for gone in [i for i in self.answers if i not in keep]:
            del self.answers[gone]
            self.version += 1

    def stored(self) -> Coroutine[Any, Any, bool]:
        """Completes once some replica's answers are stored after this call (the event is
        taken now, not when the coroutine first runs, so no store in between is missed)."""
        return self._stored.wait()


def is_dead(failing_since: float | None, now: float, *, dead_after: float,
            busy: bool) -> bool:
    """Whether to give up on a replica whose probes have failed since `failing_since` (None: its
    last probe answered): builds run on it and the failures have lasted `dead_after` (0: never).
    """
    return (failing_since is not None and busy and dead_after > 0
            and now - failing_since >= dead_after)


def _no_calls_ended(replica_id: str, reason: str) -> int:
    return 0


class Prober:
    """Owns replica readiness: active probes, and passive ejections reported by the relay."""

    def __init__(self, registry: Registry, cache: ReplicaCache, channels: Channels,
                 settings: ProbeSettings, metrics: Metrics,
                 spawn: Callable[[Coroutine[Any, Any, None], str], None],
                 ledger: Ledger) -> None:
        self.registry = registry
        self.ledger = ledger
        self.cache = cache
        self.channels = channels
        self.settings = settings
        self.metrics = metrics
        self.ejections = Ejections(base=settings.eject_backoff, cap=settings.eject_backoff_max)
        self.wake = asyncio.Event()  # set to probe at once (e.g. when an ejection ends)
        self._spawn = spawn
        self._joined = {r.id for r in registry.snapshot.replicas if r.pod_ready}
        self._failing_since: dict[str, float] = {}  # replica id -> its streak's first failure
        # Ends every call open on a replica with UNAVAILABLE (the reason in the message),
        # returns how many: the hub's, set once it exists.
        self.on_dead: Callable[[str, str], int] = _no_calls_ended
        registry.subscribe(self._registry_changed)

    def _registry_changed(self, snapshot: Snapshot) -> None:
        """Probes at once each replica that joins or whose pod turns Ready."""
        joined = set()
        for replica in snapshot.replicas:
            if replica.pod_ready and not replica.terminating:
                joined.add(replica.id)
                if replica.id not in self._joined:
                    self._spawn(self._probe(replica), f"probe {replica.id}")
        self._joined = joined

    def eject(self, replica_id: str, reason: str) -> None:
        """The relay could not reach a replica: no new builds on it for a while."""
        replica = self.registry.snapshot.by_id.get(replica_id)
        if replica is None:
            return
        loop = asyncio.get_running_loop()
        until = self.ejections.eject(replica_id, loop.time())
        log.warning("replica ejected", extra={"replica": replica_id, "error": reason,
                                              "backoff_s": round(until - loop.time(), 3)})
        self.metrics.replica_ejections.labels(replica.pool, replica_id).inc()
        self.registry.update(replica_id, ejected=True, reason=f"ejected: {reason}")
        loop.call_at(until, self.wake.set)

    async def run(self) -> None:
        while True:
            await self.probe_all()
            try:
                await asyncio.wait_for(self.wake.wait(), self.settings.interval)
            except TimeoutError:
                pass
            self.wake.clear()

    async def probe_all(self) -> None:
        # Pods that are not Ready are not probed unless builds run on them (they take no new
        # builds; failing probes would only back off their channel): they are, at once, when
        # they turn Ready.
        busy = {record.replica for record in self.ledger.active()}
        replicas = tuple(r for r in self.registry.snapshot.replicas
                         if r.pod_ready or r.id in busy)
        for replica, result in zip(replicas, await asyncio.gather(
                *(self._probe(r) for r in replicas), return_exceptions=True), strict=True):
            if isinstance(result, Exception):  # a bug, not a replica's answer: log, go on
                log.error("probe failed unexpectedly", extra={"replica": replica.id,
                                                              "error": repr(result)})
        await self.channels.retain(r.address for r in self.registry.snapshot.replicas)
        self.cache.retain(r.id for r in self.registry.snapshot.replicas)
        for gone in self._failing_since.keys() - self.registry.snapshot.by_id.keys():
            del self._failing_since[gone]

    async def _probe(self, replica: Replica) -> None:
        timeout = self.settings.timeout
        replica = self.registry.snapshot.by_id.get(replica.id, replica)
        try:
            workers = await self.channels.unary(replica.address, LIST_WORKERS, b"",
                                                timeout=timeout)
            info = await self.channels.unary(replica.address, INFO, b"", timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            self.metrics.probe_failures.labels(replica.pool, replica.id).inc()
            if replica.ready or replica.reason != reason:
                log.warning("replica not ready", extra={"replica": replica.id,
                                                        "address": replica.address,
                                                        "error": reason})
            if not replica.ejected:
                self.registry.update(replica.id, ready=False, reason=reason)
            self._failed(replica.id)
            return
        self._failing_since.pop(replica.id, None)  # it answers: whatever runs there goes on
        if replica.id not in self.registry.snapshot.by_id:
            return  # left while being probed
        self.cache.store(replica, CachedAnswers(workers, info))
        if not self.ejections.probe_ok(replica.id, asyncio.get_running_loop().time()):
            return  # still backing off after an ejection
        if not replica.ready or replica.ejected:
            log.info("replica ready", extra={"replica": replica.id, "address": replica.address})
        self.registry.update(replica.id, ready=True, ejected=False, reason="")

    def _failed(self, replica_id: str) -> None:
        """A probe failed: once the failures have lasted dead_after while builds run on the
        replica, those builds (every call open on it) end and the replica is ejected."""
        if replica_id not in self.registry.snapshot.by_id:
            return  # left while being probed
        now = asyncio.get_running_loop().time()
        since = self._failing_since.setdefault(replica_id, now)
        dead_after = self.settings.dead_after
        busy = any(record.replica == replica_id for record in self.ledger.active())
        if not is_dead(since, now, dead_after=dead_after, busy=busy):
            return
        reason = (f"it stopped answering (probes failed for {now - since:.1f}s, "
                  f"--replica-dead-after {dead_after:g}s)")
        self._failing_since[replica_id] = now  # ends what runs there again only after as long
        ended = self.on_dead(replica_id, reason)
        log.warning("replica stopped answering; its builds end", extra={
            "replica": replica_id, "error": reason, "calls": ended})
        replica = self.registry.snapshot.by_id.get(replica_id)
        if replica is not None and not replica.ejected:  # a lost connection ejects it too
            self.eject(replica_id, reason)
