"""Active probes of every replica; they also refresh the caches the control server answers from.

Design: one task loops over the registry's replicas every `interval`, probing all of them
concurrently with `Control/ListWorkers` and `Control/Info` (each bounded by `timeout`). Success
marks the replica ready and stores both raw responses in `ReplicaCache`; failure marks it not
ready with the reason. Transitions are logged once each, so an unreachable replica is reported
clearly without flooding the log, and it is never fatal. The cache keeps a replica's last
answers after it stops, so global calls are still answered with every replica down.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from gateway.config import ProbeSettings
from gateway.control.channels import Channels
from gateway.metrics import Metrics
from gateway.replicas.health import Ejections
from gateway.replicas.registry import Registry, Replica

log = logging.getLogger("gateway.probe")

LIST_WORKERS = "/moby.buildkit.v1.Control/ListWorkers"
INFO = "/moby.buildkit.v1.Control/Info"


@dataclass(frozen=True, slots=True)
class CachedAnswers:
    list_workers: bytes  # raw ListWorkersResponse
    info: bytes  # raw InfoResponse


class ReplicaCache:
    """Last answers of each replica to the global calls, by replica id."""

    def __init__(self) -> None:
        self.answers: dict[str, CachedAnswers] = {}


class Prober:
    """Owns replica readiness: active probes, and passive ejections reported by the relay."""

    def __init__(self, registry: Registry, cache: ReplicaCache, channels: Channels,
                 settings: ProbeSettings, metrics: Metrics) -> None:
        self.registry = registry
        self.cache = cache
        self.channels = channels
        self.settings = settings
        self.metrics = metrics
        self.ejections = Ejections(base=settings.eject_backoff, cap=settings.eject_backoff_max)
        self.wake = asyncio.Event()  # set to probe at once (e.g. when an ejection ends)

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
        replicas = self.registry.snapshot.replicas
        for replica, result in zip(replicas, await asyncio.gather(
                *(self._probe(r) for r in replicas), return_exceptions=True), strict=True):
            if isinstance(result, Exception):  # a bug, not a replica's answer: log, go on
                log.error("probe failed unexpectedly", extra={"replica": replica.id,
                                                              "error": repr(result)})
        await self.channels.retain(r.address for r in self.registry.snapshot.replicas)

    async def _probe(self, replica: Replica) -> None:
        timeout = self.settings.timeout
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
            return
        self.cache.answers[replica.id] = CachedAnswers(workers, info)
        if not self.ejections.probe_ok(replica.id, asyncio.get_running_loop().time()):
            return  # still backing off after an ejection
        if not replica.placeable:
            log.info("replica ready", extra={"replica": replica.id, "address": replica.address})
        self.registry.update(replica.id, ready=True, ejected=False, reason="")
