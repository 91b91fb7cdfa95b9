"""Composition root: builds every part from `Settings`, runs them in one TaskGroup, stops them.

Start-up order: registry and ledger (pure state), the Kubernetes client (if a pool is
discovered there), the control server on a private unix socket, the hub, the pod watches (their
first list awaited briefly, so a restarted gateway knows its pods before it takes builds), the
prober (first probe round before listening, so early builds find ready replicas), the scalers,
then the client listeners. Every background task is created through `spawn`: named, owned by the
TaskGroup, and guarded so that a task dying is logged instead of silently lost.

Shutdown (`stop` set, e.g. by SIGTERM) is one ordered sequence, see `_shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from gateway import __version__
from gateway.admin import status
from gateway.builds.ledger import Ledger
from gateway.config import ConfigError, Endpoint, Settings
from gateway.control.answers import CachedCalls
from gateway.control.channels import Channels
from gateway.control.probe import Prober, ReplicaCache
from gateway.control.server import ControlServer
from gateway.metrics import Metrics
from gateway.relay.client import ClientConn
from gateway.relay.hub import Hub, Spawn
from gateway.relay.tls import ListenerTls, replica_context
from gateway.replicas.registry import Registry, Replica
from gateway.scaling import shared
from gateway.scaling.shared import Demand

if TYPE_CHECKING:
    # Imported where used, only when configured (start-up memory, bench/README.md): the
    # Kubernetes client (kubernetes_asyncio and its generated models, about 40 MiB) with a
    # Kubernetes pool, aiohttp (about 10 MiB) with --admin-listen.
    from gateway.admin.server import AdminServer
    from gateway.discovery import kube as kubernetes
    from gateway.discovery.watch import PodWatch
    from gateway.scaling.lease import Coordinator
    from gateway.scaling.scaler import PoolScaler

log = logging.getLogger("gateway")

FIRST_LIST_WAIT = 5.0
"""Seconds start-up waits for the pod watches' first lists (the API may be down: then the
gateway starts with no pods and the watches keep trying)."""


async def _guard(coro: Coroutine[Any, Any, None], name: str) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background task died", extra={"task": name})


def static_replicas(settings: Settings) -> list[Replica]:
    return [Replica(id=ep.name, address=str(ep), pool=pool.name)
            for pool in settings.pools for ep in pool.replicas]


class Gateway:
    """A running gateway; `listening` holds the bound client endpoints once started."""

    def __init__(self, settings: Settings, *, settle_gc: bool = False) -> None:
        self.settings = settings
        self.settle_gc = settle_gc  # the process is the gateway's own (cli): see _settle_gc
        self.registry = Registry(static_replicas(settings))
        self.ledger = Ledger()
        self.cache = ReplicaCache()
        self.answers = CachedCalls(self.registry, self.cache)  # answered by the relay itself
        self.channels = Channels(settings.replica_tls)
        self.listening: list[Endpoint] = []
        self.started = asyncio.Event()
        self.stop = asyncio.Event()
        self.hub: Hub | None = None
        self.prometheus = CollectorRegistry()
        self.metrics = Metrics(self.prometheus, version=__version__)
        self.admin: AdminServer | None = None
        self.kube: kubernetes.Kube | None = None
        self.watches: dict[str, PodWatch] = {}
        self.scalers: dict[str, PoolScaler] = {}
        self.coordinator: Coordinator | None = None  # with autoscaling (scaling/lease.py)
        self.control: ControlServer | None = None

    async def run(self) -> None:
        settings = self.settings
        kube_pools = [p for p in settings.pools if p.kube is not None]
        if kube_pools:
            from gateway.discovery import kube as kubernetes

            try:
                self.kube = await kubernetes.connect(settings.kube, self.metrics)
            except Exception as exc:  # the client's own ConfigException and file errors
                raise ConfigError(f"cannot configure the Kubernetes client (--kubeconfig, "
                                  f"--kube-context, in-cluster): {exc}") from exc
        self.tls = (ListenerTls(settings.tls, metrics=self.metrics)
                    if settings.tls is not None else None)
        replica_tls = (replica_context(settings.replica_tls)
                       if settings.replica_tls is not None else None)
        workdir = tempfile.mkdtemp(prefix="buildkit-gateway-")
        control_socket = os.path.join(workdir, "control.sock")
        control = ControlServer(self.registry, self.cache, self.channels, self.ledger,
                                first_answer_wait={p.name: p.queue_timeout for p in kube_pools})
        self.control = control
        await control.start(control_socket)
        servers: list[asyncio.Server] = []
        try:
            async with asyncio.TaskGroup() as tg:

                tasks: list[asyncio.Task[None]] = []

                def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
                    task = tg.create_task(_guard(coro, name), name=name)
                    tasks.append(task)
                    task.add_done_callback(tasks.remove)

                prober = Prober(self.registry, self.cache, self.channels, settings.probe,
                                self.metrics, spawn, self.ledger)
                hub = Hub(relay=settings.relay, routing=settings.routing, pools=settings.pools,
                          registry=self.registry, ledger=self.ledger,
                          control=Endpoint("unix", path=control_socket), spawn=spawn,
                          metrics=self.metrics, eject=prober.eject,
                          replica_tls=replica_tls,
                          servername=settings.replica_tls.servername
                          if settings.replica_tls is not None else "")
                prober.on_dead = hub.replica_dead
                self.hub = hub
                self.metrics.watch(lambda: status.gauges(hub))
                await self._discover(spawn)
                await prober.probe_all()
                spawn(prober.run(), "probe replicas")
                self._scale(spawn, hub)
                if self.tls is not None:
                    spawn(self.tls.watch(), "watch tls files")
                if not self.registry.snapshot.replicas:
                    log.warning("no replicas configured; builds will wait until some are added")
                if settings.admin.listen is not None:
                    from gateway.admin.server import AdminServer

                    self.admin = AdminServer(hub, self.prometheus, version=__version__,
                                             extra=self._status)
                    await self.admin.start(*settings.admin.listen)
                for ep in (*settings.listen.endpoints,
                           *(ep for pool in settings.pools for ep in pool.listen)):
                    servers.append(await self._listen(hub, ep))
                log.info("gateway listening", extra={
                    "listen": ",".join(map(str, self.listening)),
                    "admin": f"{settings.admin.listen[0]}:{self.admin.port}"
                    if self.admin and settings.admin.listen else "off",
                    "replicas": ",".join(r.id for r in self.registry.snapshot.replicas),
                    "pools": ",".join(p.name for p in settings.pools)})
                if self.settle_gc:
                    _settle_gc()
                self.started.set()
                await self.stop.wait()
                await self._shutdown(hub, servers, control)
                for task in list(tasks):  # background loops end with the gateway
                    task.cancel()
        finally:
            await self.channels.close()
            if self.kube is not None:
                await self.kube.close()
            shutil.rmtree(workdir, ignore_errors=True)

    async def _discover(self, spawn: Spawn) -> None:
        """Starts a pod watch per discovered pool; waits a little for their first lists."""
        kube = self.kube
        if kube is None:
            return
        from gateway.discovery.watch import PodWatch

        for pool in self.settings.pools:
            if pool.kube is None:
                continue
            watch = PodWatch(pool=pool.name, workload=pool.kube, kube=kube,
                             registry=self.registry, settings=self.settings.kube,
                             metrics=self.metrics,
                             on_change=functools.partial(self._poke, pool.name))
            self.watches[pool.name] = watch
            spawn(watch.run(), f"watch pods of pool {pool.name}")
        if self.watches:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(
                    *(w.synced.wait() for w in self.watches.values())), FIRST_LIST_WAIT)

    def _scale(self, spawn: Spawn, hub: Hub) -> None:
        """Starts a scaler per autoscaled pool; demand changes reach it synchronously. With
        any, the gateway also takes part in the election of the one gateway that scales and
        publishes its demand (scaling/lease.py)."""
        kube = self.kube
        autoscaled = [(p.name, p.scaling, p.kube) for p in self.settings.pools
                      if p.scaling is not None and p.kube is not None]
        if not autoscaled or kube is None:
            return
        from gateway.scaling.lease import Coordinator, own_identity
        from gateway.scaling.scaler import PoolScaler

        names = [name for name, _, _ in autoscaled]
        coordinator = Coordinator(
            kube=kube, settings=self.settings.kube,
            namespace=autoscaled[0][2].namespace or kube.namespace,
            identity=own_identity(self.settings.kube.identity),
            demand=lambda: {name: self._own_demand(name) for name in names},
            memory=hub.affinity, metrics=self.metrics, on_change=self._leadership_changed)
        self.coordinator = coordinator
        for name, policy, workload in autoscaled:
            watch = self.watches[name]
            scaler = PoolScaler(pool=name, policy=policy, workload=workload,
                                kube=kube, settings=self.settings.kube, registry=self.registry,
                                pods=functools.partial(getattr, watch, "pods"),
                                synced=watch.synced,
                                demand=self._demand, metrics=self.metrics,
                                on_starting=hub.set_starting,
                                leading=lambda: coordinator.leading)
            self.scalers[name] = scaler
            spawn(scaler.run(), f"scale pool {name}")
        spawn(coordinator.run(), "elect the scaler and publish demand")
        hub.on_demand = self._poke
        if self.control is not None:
            self.control.on_demand = self._poke

    def _poke(self, pool: str) -> None:
        scaler = self.scalers.get(pool)
        if scaler is not None:
            scaler.poke()
        if self.coordinator is not None:
            self.coordinator.demand_changed()

    def _leadership_changed(self) -> None:
        for scaler in self.scalers.values():
            scaler.poke()

    def _demand(self, pool: str) -> Demand:
        """Every gateway's demand for a pool (the others' as they published it)."""
        own = self._own_demand(pool)
        if self.coordinator is None:
            return own
        return shared.total(own, self.coordinator.others(pool))

    def _own_demand(self, pool: str) -> Demand:
        """This gateway's builds of a pool: placed, queued (and calls waiting for a first
        replica), and the replicas they keep busy."""
        assert self.hub is not None
        ids = {r.id for r in self.registry.snapshot.replicas if r.pool == pool}
        loads = self.ledger.loads()
        busy = {rec.replica for rec in self.ledger.active() if rec.replica in ids}
        queue = self.hub.pools[pool].queue
        busy |= {w.target for w in queue if w.target is not None}
        waiting = self.control.waiting.get(pool, 0) if self.control is not None else 0
        return Demand(running=sum(loads.get(i, 0) for i in ids),
                      queued=len(queue) + waiting, busy=frozenset(busy))

    def _status(self, now: float) -> dict[str, Any]:
        """The Kubernetes and scaling parts of /api/status."""
        if self.kube is None:
            return {}
        return {
            "kubernetes": self.kube.health.document(now),
            "scaling": {name: s.document(now) for name, s in self.scalers.items()},
            "election": self.coordinator.document(now) if self.coordinator else None,
            "discovery": {name: {"namespace": w.namespace, "selector": w.selector,
                                 "pods": len(w.pods), "resource_version": w.resource_version}
                          for name, w in self.watches.items()},
        }

    async def _listen(self, hub: Hub, ep: Endpoint) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        label = str(ep)

        def conn() -> ClientConn:
            return ClientConn(hub, listener=label, answers=self.answers)

        if ep.scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path)  # a stale socket from an earlier run
            server = await loop.create_unix_server(conn, ep.path)
            self.listening.append(ep)
        else:
            factory: Callable[[], asyncio.BaseProtocol] = conn
            if self.tls is not None:  # TLS by the relay's own protocol (relay/tls.py)
                factory = self.tls.protocol(
                    conn, handshake_timeout=self.settings.relay.handshake_timeout)
            server = await loop.create_server(factory, ep.host, ep.port)
            port = server.sockets[0].getsockname()[1]
            self.listening.append(Endpoint("tcp", host=ep.host, port=port))
        return server

    async def _shutdown(self, hub: Hub, servers: list[asyncio.Server],
                        control: ControlServer) -> None:
        # 1. Readiness off (/readyz answers 503), no more connections.
        hub.draining = True
        for server in servers:
            server.close()
        log.info("gateway stopping", extra={"clients": len(hub.clients),
                                            "queued": hub.queued()})
        # 1b. Another gateway scales from now on (the election handed back at once); this one
        #     goes on publishing the demand of its draining builds.
        if self.coordinator is not None:
            await self.coordinator.resign()
        # 2. No new builds: queued ones get UNAVAILABLE, running ones may finish, and each
        #    connection gets GOAWAY once its builds are done.
        for conn in list(hub.clients):
            conn.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hub.no_clients.wait(), self.settings.admin.shutdown_grace)
        # 3. Past the grace: cut what is left, then the replica connections, the control
        #    server (which answers nothing once no client is left) and the admin server.
        for conn in list(hub.clients):
            conn.abort()
        for upstream in hub.upstreams.values():
            upstream.close()
        await control.stop()
        if self.admin is not None:
            await self.admin.stop()
        # 4. This gateway's demand is withdrawn (its Lease deleted).
        if self.coordinator is not None:
            await self.coordinator.withdraw()
        log.info("gateway stopped")


def _settle_gc() -> None:
    """Once started: most start-up objects live for good, so the cyclic GC stops walking them.

    A full collection walks every tracked object, and start-up makes tens of thousands (grpcio,
    aiohttp, prometheus): one took 26 ms, a stall of the event loop and of every build's data.
    `gc.freeze()` moves every object that exists now to a permanent generation (after a
    collection, so no garbage is frozen); collections then walk only what was made since. A
    frozen object that later becomes cyclic garbage is never reclaimed (few do: a replica's
    channel dropped by discovery). The collection after the freeze walks almost nothing; it
    resets CPython's count of long-lived objects, which still includes the frozen ones and would
    otherwise make full collections of later objects rare. Thresholds stay CPython's: young
    collections cost little (0.4-1.5 ms per 200 MB upload, measured). Only for a process that is the
    gateway's own: it affects every object in the interpreter.
    """
    gc.collect()
    gc.freeze()
    gc.collect()
