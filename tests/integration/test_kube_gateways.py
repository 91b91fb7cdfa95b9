"""Several gateways, one scaler, against a real kube-apiserver (tests/fakes/kube.py).

Two gateways discover the same `buildkitd` Deployment: one in this process, one a separate
process (so that it can be killed with SIGKILL, as a node loss would). Exactly one holds the
scaler Lease; builds queued only on the other make it scale; when the leader dies the other
takes over within the lease duration, and when it drains (SIGTERM) it hands the Lease over at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from gateway.app import Gateway
from gateway.routing.ring import HashRing
from tests.conftest import running_gateway
from tests.fakes import buildflow, kube
from tests.fakes.replica import FakeReplica
from tests.integration.test_kube_scaling import (
    DEPLOYMENT,
    Pool,
    api_status,
    build,
    rbac,
    replica_hooks,
    scaling,
)

LEASE = "buildkit-gateway"
DURATION = 3.0  # --kube-lease-duration of these tests (renewed every 0.6 s)
EVERY = DURATION / 5


@dataclass
class Cluster:
    """A namespace with the Deployment and its test controller, shared by the gateways."""

    cluster: kube.KubeCluster
    admin: ApiClient
    namespace: str
    controller: kube.TestController
    fakes: dict[str, FakeReplica]

    def args(self, identity: str, *extra: str) -> list[str]:
        return ["--kubeconfig", str(self.cluster.kubeconfig), "--kube-context", "gateway",
                "--kube-namespace", self.namespace, "--kube-deployment", DEPLOYMENT,
                "--kube-port", "buildkitd", "--identity", identity,
                "--kube-lease-duration", f"{DURATION}s",
                *scaling(window="60s", max_replicas=5), *extra]

    async def holder(self) -> str:
        try:
            lease = await k8s.CoordinationV1Api(self.admin).read_namespaced_lease(
                LEASE, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return ""
            raise
        return str((lease.spec and lease.spec.holder_identity) or "")

    async def until_holder(self, wanted: Callable[[str], bool], timeout: float) -> str:
        """Waits (a watch on the Lease) until its holder satisfies `wanted`; returns it."""
        holder = await self.holder()
        if wanted(holder):
            return holder
        api = k8s.CoordinationV1Api(self.admin)
        async with asyncio.timeout(timeout):
            while True:
                async with k8s_watch.Watch() as w:
                    async for event in w.stream(api.list_namespaced_lease, self.namespace,
                                                field_selector=f"metadata.name={LEASE}",
                                                timeout_seconds=max(1, int(timeout))):
                        spec = event["object"].spec
                        holder = str((spec and spec.holder_identity) or "")
                        if wanted(holder):
                            return holder


@contextlib.asynccontextmanager
async def shared_cluster(cluster: kube.KubeCluster, *, replicas: int = 0,
                         kind: str = "Deployment", roles: str = "") -> AsyncIterator[Cluster]:
    """A namespace with deploy/'s RBAC (`roles`: other RBAC YAML), the workload and its
    test controller."""
    admin = await kube.api_client(cluster, "admin")
    namespace = await kube.new_namespace(admin)
    await kube.apply_rbac(cluster, namespace, roles or rbac())
    fakes, start_replica, stop_replica = replica_hooks()
    controller = await kube.TestController.start(
        admin, namespace, DEPLOYMENT, port=kube.free_port(), replicas=replicas,
        start_replica=start_replica, stop_replica=stop_replica, kind=kind)
    try:
        if replicas:
            await controller.wait_for(lambda c: sum(p.ready for p in c.active()) == replicas, 30)
        yield Cluster(cluster, admin, namespace, controller, fakes)
    finally:
        await controller.close()
        await admin.close()


@dataclass
class GatewayProcess:
    """A gateway in a process of its own (`python -m gateway`)."""

    process: asyncio.subprocess.Process
    port: int
    log: list[str]

    @classmethod
    @contextlib.asynccontextmanager
    async def run(cls, args: list[str]) -> AsyncIterator[GatewayProcess]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--listen", "tcp://127.0.0.1:0",
            "--admin-listen", "127.0.0.1:0", "--probe-interval", "0.5s", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log: list[str] = []
        assert process.stderr is not None
        try:
            async with asyncio.timeout(30):
                while True:  # its log says where it listens
                    line = (await process.stderr.readline()).decode()
                    if not line:
                        raise RuntimeError(f"gateway process ended: {''.join(log)}")
                    log.append(line)
                    found = re.search(r"gateway listening .*listen=tcp://127\.0\.0\.1:(\d+)",
                                      line)
                    if found:
                        break
            drain = asyncio.create_task(_collect(process, log))
            yield cls(process, int(found.group(1)), log)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(20):
                        await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            with contextlib.suppress(Exception):
                await drain

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


async def _collect(process: asyncio.subprocess.Process, log: list[str]) -> None:
    assert process.stderr is not None
    while line := await process.stderr.readline():
        log.append(line.decode())


def pool_of(c: Cluster, gw: Gateway) -> Pool:
    pool = Pool(gw, c.controller, c.admin, c.namespace, c.fakes)
    pool.watch_gateway()
    return pool


async def test_one_leader_scales_for_the_builds_queued_on_the_other_and_a_successor_takes_over(
        kube_cluster: kube.KubeCluster) -> None:
    async with shared_cluster(kube_cluster) as c, GatewayProcess.run(c.args("gw-b")) as b:
        assert await c.until_holder(lambda h: h == "gw-b", 15) == "gw-b"
        async with running_gateway([], *c.args("gw-a")) as gw:
            pool = pool_of(c, gw)
            assert gw.coordinator is not None and not gw.coordinator.leading
            assert gw.prometheus.get_sample_value("buildkit_gateway_scaler_leader") == 0
            # Builds only on the follower, at zero replicas: the leader scales for them.
            outs = await asyncio.gather(*(build(pool, i, seconds=0.3) for i in range(2)))
            assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
            assert (c.controller.spec_replicas or 0) >= 2
            assert gw.scalers["default"].events == []  # not by this gateway
            # Both route a key alike (the ring is the ready pods' names).
            await c.controller.wait_for(lambda ctl: sum(p.ready for p in ctl.active()) >= 2, 30)
            via_a = await build(pool, 7)
            via_b = await buildflow.build(
                await _connect(b.port), context_dir="/src/p7", node_id="b-node", timeout=60)
            assert via_a.ok and via_b.ok, (via_a.error, via_b.error)
            assert via_a.replica == via_b.replica
            status = await api_status(gw)
            assert status["election"]["leader"] == "gw-b"
            assert status["election"]["gateways"] == ["gw-a", "gw-b"]
            # The leader dies without a word: the follower takes over within the duration.
            killed_at = asyncio.get_running_loop().time()
            await b.kill()
            await pool.until(lambda: gw.coordinator is not None and gw.coordinator.leading,
                             timeout=DURATION * 3)
            took = asyncio.get_running_loop().time() - killed_at
            print(f"\nleader SIGKILLed: the other gateway leads {took:.2f} s later "
                  f"(lease {DURATION:.0f} s, renewed every {EVERY:.1f} s)")
            assert took <= DURATION + 2 * EVERY
            assert gw.prometheus.get_sample_value("buildkit_gateway_scaler_leader") == 1
            assert await c.holder() == "gw-a"
            # ... and goes on scaling: one build more than there are replicas.
            before = c.controller.spec_replicas or 0
            outs = await asyncio.gather(*(build(pool, i, seconds=1) for i in range(before + 1)))
            assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
            assert c.controller.spec_replicas == before + 1
            assert [e[1] for e in gw.scalers["default"].events] == ["up"]


async def test_a_draining_leader_hands_over_at_once_and_withdraws_its_demand(
        kube_cluster: kube.KubeCluster) -> None:
    async with shared_cluster(kube_cluster, replicas=1) as c:
        async with running_gateway([], *c.args("gw-a")) as a:
            pool_a = pool_of(c, a)
            await pool_a.until(lambda: a.coordinator is not None and a.coordinator.leading)
            async with running_gateway([], *c.args("gw-b")) as b:
                pool_b = pool_of(c, b)
                running = asyncio.create_task(build(pool_a, 1, seconds=2))
                await pool_a.until(lambda: len(a.ledger.loads()) == 1)
                a.stop.set()  # SIGTERM: a drains its build
                stopped_at = asyncio.get_running_loop().time()
                await pool_b.until(lambda: b.coordinator is not None and b.coordinator.leading,
                                   timeout=DURATION)
                handed = asyncio.get_running_loop().time() - stopped_at
                print(f"\ndraining leader: the other leads {handed:.2f} s later")
                assert handed < DURATION  # handed back, not expired
                out = await running
                assert out.ok, out.error  # the draining gateway's build finished
                # Its demand is withdrawn once it stopped: the new leader no longer counts it.
                await pool_b.until(lambda: b.coordinator is not None
                                   and not b.coordinator.others("default"), timeout=DURATION)
                # The queue keeps moving on the new leader: a build needing a second replica.
                outs = await asyncio.gather(*(build(pool_b, i, seconds=0.3) for i in (2, 3)))
                assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
                assert c.controller.spec_replicas == 2
        # Every gateway gone: no demand Lease left behind.
        leases = await k8s.CoordinationV1Api(c.admin).list_namespaced_lease(c.namespace)
        assert [x.metadata.name for x in leases.items] == [LEASE]


def affinity_counts(*gateways: Gateway) -> dict[str, float]:
    return {result: sum(gw.prometheus.get_sample_value(
        "buildkit_gateway_affinity_placements_total", {"pool": "default", "result": result})
        or 0.0 for gw in gateways) for result in ("hit", "miss", "new")}


async def test_keys_go_back_to_the_pod_holding_their_cache_after_a_scale_up_on_any_gateway(
        kube_cluster: kube.KubeCluster) -> None:
    keys = range(50)
    async with shared_cluster(kube_cluster, replicas=2) as c, \
            running_gateway([], *c.args("gw-a")) as a, running_gateway([], *c.args("gw-b")) as b:
        pool_a, pool_b = pool_of(c, a), pool_of(c, b)
        two = sorted(p.name for p in c.controller.active())
        for gw, pool in ((a, pool_a), (b, pool_b)):
            await pool.until(lambda gw=gw: len(gw.registry.snapshot.placeable()) == 2)
        first: dict[int, str] = {}
        for i in keys:  # every key built once, through gateway a
            out = await build(pool_a, i)
            assert out.ok, out.error
            first[i] = out.replica
        # The pool grows to four (as the leader does for a burst); gateway b has the places of
        # a's builds from a's Lease.
        await c.controller.scale(4)
        for gw, pool in ((a, pool_a), (b, pool_b)):
            await pool.until(lambda gw=gw: len(gw.registry.snapshot.placeable()) == 4)
        await pool_b.until(lambda: len(b.hub.affinity) >= len(keys), timeout=DURATION * 2)
        four = sorted(p.name for p in c.controller.active())
        again: dict[int, str] = {}
        for i in keys:  # the same keys, half through each gateway
            out = await build(pool_a if i % 2 else pool_b, i)
            assert out.ok, out.error
            again[i] = out.replica
        back = sum(again[i] == first[i] for i in keys)
        ring_moved = sum(HashRing(two).lookup(f"ctx:p{i}") != HashRing(four).lookup(
            f"ctx:p{i}") for i in keys)
        counts = affinity_counts(a, b)
        ratio = counts["hit"] / (counts["hit"] + counts["miss"])
        print(f"\n50 keys built on 2 pods, pool scaled to 4: {back}/50 back on their pod "
              f"(affinity hit ratio {ratio:.2f}); the ring alone would move {ring_moved}/50")
        assert back >= 48  # at least 95%
        assert ratio >= 0.95 and counts["hit"] + counts["miss"] == len(keys)
        assert ring_moved >= 15


async def _connect(port: int) -> buildflow.Transport:
    from tests.integration.clients import connect

    return await connect("grpc-go", port)
