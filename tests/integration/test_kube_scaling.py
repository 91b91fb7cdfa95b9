"""Kubernetes discovery and autoscaling against a real kube-apiserver (tests/fakes/kube.py).

Each test gets its own namespace with a `buildkitd` Deployment driven by the test controller
(pods on their own loopback IPs, each with a fake BuildKit replica), and a gateway that reaches
the API as the token user `gateway` with exactly the rights of deploy/base/gateway-rbac.yaml:
a missing permission fails these tests, and so would an extra one the code starts to need.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from kubernetes_asyncio.client import ApiClient

from gateway.app import Gateway
from gateway.replicas.registry import Snapshot
from gateway.routing.affinity import Entry
from gateway.scaling.decision import BUSY_COST, VICTIM_COST
from tests.conftest import gateway_port, running_gateway
from tests.fakes import buildflow, kube
from tests.fakes.ids import node_id
from tests.fakes.replica import BUILD_SECONDS, FakeReplica
from tests.integration.clients import connect

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "buildkitd"
WAIT = "[gateway] waiting for a builder"


def granted() -> set[tuple[str, str]]:
    """(verb, resource[/subresource]) the Role of deploy/ grants."""
    docs = yaml.safe_load_all((ROOT / "deploy/base/gateway-rbac.yaml").read_text())
    role = next(d for d in docs if d["kind"] == "Role")
    return {(verb, resource) for rule in role["rules"] for resource in rule["resources"]
            for verb in rule["verbs"]}


def used(cluster: kube.KubeCluster, namespace: str, expect: set[tuple[str, str]], *,
         timeout: float = 10.0) -> tuple[set[tuple[str, str]], list[str]]:
    """(verb, resource) the user `gateway` asked for in a namespace, and what was refused, from
    the API server's audit log (hack/kube/cluster.sh). Re-read until it holds `expect` or
    `timeout` passes: the server writes events when requests end and offers nothing to wait
    on (runs in a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        asked, refused = _audited(cluster, namespace)
        if asked >= expect or time.monotonic() > deadline:
            return asked, refused
        time.sleep(0.05)


def _audited(cluster: kube.KubeCluster, namespace: str) -> tuple[set[tuple[str, str]],
                                                                  list[str]]:
    asked: set[tuple[str, str]] = set()
    refused: list[str] = []
    for line in (cluster.dir / "audit.log").read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if event["user"]["username"] != "gateway" or ref.get("namespace") != namespace:
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        asked.add((event["verb"], resource))
        if event.get("responseStatus", {}).get("code") in (401, 403):
            refused.append(f"{event['verb']} {resource}")
    return asked, refused


def rbac() -> str:
    """deploy/'s RBAC, also bound to the test cluster's token user `gateway`."""
    docs = list(yaml.safe_load_all((ROOT / "deploy/base/gateway-rbac.yaml").read_text()))
    for doc in docs:
        if doc["kind"] == "RoleBinding":
            doc["subjects"].append({"kind": "User", "name": "gateway",
                                    "apiGroup": "rbac.authorization.k8s.io"})
    return yaml.safe_dump_all(docs)


@dataclass
class Pool:
    gw: Gateway
    controller: kube.TestController
    admin: ApiClient
    namespace: str
    replicas: dict[str, FakeReplica] = field(default_factory=dict)  # every pod's, kept
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # the gateway's state

    def watch_gateway(self) -> None:
        """`changed` is set on every registry change, every change of a pool's builds and
        every failed call to the Kubernetes API, every change of the election and every merge of
        the other gateways' cache-affinity entries."""
        hub = self.gw.hub
        assert hub is not None
        self.gw.registry.subscribe(lambda _snapshot: self.changed.set())
        on_demand = hub.on_demand

        def demand_changed(pool: str) -> None:
            on_demand(pool)
            self.changed.set()

        hub.on_demand = demand_changed  # type: ignore[method-assign]
        assert self.gw.kube is not None
        health = self.gw.kube.health
        failed = health.failed

        def api_failed(operation: str, exc: BaseException) -> None:
            failed(operation, exc)
            self.changed.set()

        health.failed = api_failed  # type: ignore[method-assign]
        coordinator = self.gw.coordinator
        if coordinator is not None:  # leadership or the others' demand changed
            on_change = coordinator.on_change

            def election_changed() -> None:
                on_change()
                self.changed.set()

            coordinator.on_change = election_changed
            merge = coordinator.memory.merge

            def merged(entries: Iterable[Entry]) -> int:
                taken = merge(entries)
                self.changed.set()
                return taken

            coordinator.memory.merge = merged  # type: ignore[method-assign]

    @property
    def port(self) -> int:
        return gateway_port(self.gw)

    def placed_on(self, ref: str) -> str | None:
        return next((rec.replica for rec in self.gw.ledger.active() if rec.ref == ref), None)

    async def until(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        """Waits for gateway or cluster state, re-checked on every change of either."""
        try:
            await self.wait(predicate, timeout)
        except TimeoutError as exc:
            scalers = {n: (s.events, s.victims, s.leaving) for n, s in self.gw.scalers.items()}
            raise TimeoutError(f"not within {timeout}s; scalers {scalers}; controller "
                               f"{self.controller.describe()}") from exc

    async def wait(self, predicate: Callable[[], bool], timeout: float,
                   *also: asyncio.Event) -> None:
        """`until` without the diagnosis; `also`: more events that mean a change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                for event in (self.changed, *also):
                    event.clear()
                waits = {asyncio.ensure_future(self.controller.next_change()),
                         *(asyncio.ensure_future(e.wait()) for e in (self.changed, *also))}
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()


def replica_hooks() -> tuple[dict[str, FakeReplica], kube.StartReplica, kube.StopReplica]:
    """The test controller's kubelet hooks: a FakeReplica per pod (kept in the dict, by pod)."""
    fakes: dict[str, FakeReplica] = {}

    async def start_replica(pod: str, ip: str, port: int) -> None:
        replica = FakeReplica(pod)
        await replica.start(ip, port)
        fakes[pod] = replica

    async def stop_replica(pod: str) -> None:
        if pod in fakes:
            await fakes[pod].stop(grace=0)

    return fakes, start_replica, stop_replica


@contextlib.asynccontextmanager
async def kube_pool(cluster: kube.KubeCluster, *args: str, replicas: int = 0,
                    auto_ready: bool = True, in_cluster: bool = False) -> AsyncIterator[Pool]:
    """A namespace with the Deployment, its test controller, and a gateway discovering it:
    through the kubeconfig's `gateway` context, or `in_cluster` (see `in_cluster_files`)."""
    admin = await kube.api_client(cluster, "admin")
    namespace = await kube.new_namespace(admin)
    await kube.apply_rbac(cluster, namespace, rbac())
    port = kube.free_port()
    fakes, start_replica, stop_replica = replica_hooks()
    controller = await kube.TestController.start(
        admin, namespace, DEPLOYMENT, port=port, replicas=replicas, auto_ready=auto_ready,
        start_replica=start_replica, stop_replica=stop_replica)
    try:
        if replicas:
            await controller.wait_for(lambda c: sum(p.ready for p in c.active()) == replicas, 30)
        where = () if in_cluster else (
            "--kubeconfig", str(cluster.kubeconfig), "--kube-context", "gateway",
            "--kube-namespace", namespace)
        async with contextlib.AsyncExitStack() as stack:
            if in_cluster:
                stack.enter_context(in_cluster_files(cluster, namespace))
            gw = await stack.enter_async_context(running_gateway(
                [], *where, "--kube-deployment", DEPLOYMENT, "--kube-port", "buildkitd", *args))
            pool = Pool(gw, controller, admin, namespace, fakes)
            pool.watch_gateway()
            yield pool
    finally:
        await controller.close()
        await admin.close()


@contextlib.contextmanager
def in_cluster_files(cluster: kube.KubeCluster, namespace: str) -> Iterator[None]:
    """What a pod gets: KUBERNETES_SERVICE_HOST/PORT and the service account's token, CA and
    namespace files (here the token of the user `gateway`), where the client reads them."""
    from kubernetes_asyncio.config import incluster_config

    from gateway.discovery import kube as discovery

    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        (files / "token").write_text("gateway-token")
        (files / "namespace").write_text(namespace)
        saved = (incluster_config.SERVICE_TOKEN_FILENAME, incluster_config.SERVICE_CERT_FILENAME,
                 discovery.SERVICE_ACCOUNT_NAMESPACE, dict(os.environ))
        incluster_config.SERVICE_TOKEN_FILENAME = str(files / "token")
        incluster_config.SERVICE_CERT_FILENAME = str(cluster.dir / "pki" / "ca.crt")
        discovery.SERVICE_ACCOUNT_NAMESPACE = str(files / "namespace")
        os.environ.update(KUBERNETES_SERVICE_HOST="127.0.0.1",
                          KUBERNETES_SERVICE_PORT=str(cluster.port))
        try:
            yield
        finally:
            (incluster_config.SERVICE_TOKEN_FILENAME, incluster_config.SERVICE_CERT_FILENAME,
             discovery.SERVICE_ACCOUNT_NAMESPACE, environ) = saved
            os.environ.clear()
            os.environ.update(environ)


def scaling(*, window: str, max_replicas: int = 3) -> tuple[str, ...]:
    return ("--min-replicas", "0", "--max-replicas", str(max_replicas), "--target-builds", "1",
            "--max-builds", "1", "--scale-down-window", window)


async def build(pool: Pool, i: int, *, seconds: float = 0.0, style: str = "grpc-go",
                t: buildflow.Transport | None = None) -> buildflow.BuildOutcome:
    own = t is None
    t = t or await connect(style, pool.port)
    try:
        return await buildflow.build(
            t, context_dir=f"/src/p{i}", node_id=node_id(), rng=random.Random(i), timeout=60,
            frontend_attrs={BUILD_SECONDS: str(seconds)} if seconds else {})
    finally:
        if own:
            await t.close()


def waits(outcome: buildflow.BuildOutcome) -> list[str]:
    return [v.name for s in outcome.status for v in s.vertexes if v.name.startswith(WAIT)]


async def test_burst_from_zero_scales_up_at_once_and_every_build_succeeds(
        kube_cluster: kube.KubeCluster) -> None:
    async with kube_pool(kube_cluster, *scaling(window="60s")) as pool:
        scaler = pool.gw.scalers["default"]
        outs = await asyncio.gather(*(build(pool, i, seconds=0.5) for i in range(6)))
        assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
        # the first update left zero (no pod existed), only up, never past max
        assert scaler.events[0][1:3] == ("up", 0), scaler.events
        assert all(d == "up" and b <= 3 for _t, d, _a, b in scaler.events), scaler.events
        assert pool.controller.spec_replicas == 3
        ran = {o.replica for o in outs}
        assert ran <= set(pool.controller.ips) and len(ran) >= 3, ran


async def test_idle_pods_go_after_the_window_and_a_build_at_zero_starts_one(
        kube_cluster: kube.KubeCluster) -> None:
    async with kube_pool(kube_cluster, *scaling(window="1s")) as pool:
        outs = await asyncio.gather(*(build(pool, i, seconds=0.3) for i in range(3)))
        assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
        # idle for the window: back to min, every pod removed was made the cheapest first
        costs: dict[str, int | None] = {}

        def record_costs() -> bool:
            costs.update({n: p.cost for n, p in pool.controller.pods.items()
                          if p.cost is not None})
            return pool.controller.spec_replicas == 0 and not pool.controller.pods

        await pool.until(record_costs, timeout=30)
        assert set(pool.controller.deleted) == {o.replica for o in outs} | set(
            pool.controller.deleted)
        assert all(costs.get(n) == VICTIM_COST for n in pool.controller.deleted), costs
        scaler = pool.gw.scalers["default"]
        assert [e[1] for e in scaler.events][-1] == "down"
        # the next build at zero: it waits, a replica starts, it is dispatched once Ready
        started = asyncio.get_running_loop().time()
        out = await build(pool, 99, seconds=0.1)
        assert out.ok, out.error
        assert f"{WAIT}: starting 1 replica" in waits(out)
        ready_at = pool.controller.ready_at[out.replica]
        placed = next(r for r in pool.gw.ledger.finished() if r.ref == out.ref).started
        dispatch = placed - ready_at
        print(f"\nscale from zero: build dispatched {dispatch * 1000:.1f} ms after its pod "
              f"turned Ready ({ready_at - started:.2f} s from the build's start to Ready)")
        assert 0 <= dispatch < 1.0
    # Up, down with victims, discovery: every right deploy/ grants was used, none refused.
    # (A watch is audited when it ends: the gateway has stopped by now.)
    asked, refused = await asyncio.to_thread(used, kube_cluster, pool.namespace, granted())
    assert not refused, refused
    assert asked == granted(), (sorted(asked), sorted(granted()))


async def test_scale_down_keeps_the_pod_of_the_long_build(
        kube_cluster: kube.KubeCluster) -> None:
    # The window starts with the gateway: long enough for the builds to arrive first.
    async with kube_pool(kube_cluster, *scaling(window="3s"), replicas=3) as pool:
        long_build = asyncio.create_task(build(pool, 0, seconds=10))
        await pool.until(lambda: len(pool.gw.ledger.loads()) == 1)
        short = await asyncio.gather(*(build(pool, i, seconds=0.2) for i in (1, 2)))
        assert all(o.ok for o in short), [(o.error, o.replica) for o in short]
        await pool.until(lambda: pool.controller.spec_replicas == 1
                         and len(pool.controller.active()) == 1, timeout=30)
        kept = pool.controller.active()[0].name
        out = await long_build
        assert out.ok, (out.error, out.replica, pool.controller.describe(),
                        pool.gw.scalers["default"].events)
        assert out.replica == kept and kept not in pool.controller.deleted


async def test_a_victim_that_gets_a_bound_build_keeps_it(
        kube_cluster: kube.KubeCluster) -> None:
    """The race: a connection bound to the pod just chosen as victim sends its next build
    while the scaler is between draining it and lowering the count (held there for real by
    freezing the API server, so the deletion-cost update waits)."""
    async with kube_pool(kube_cluster, *scaling(window="3s", max_replicas=2),
                         replicas=2) as pool:
        apiserver = int((kube_cluster.dir / "apiserver.pid").read_text())
        bound = await connect("grpc-go", pool.port)
        frozen: list[str] = []
        try:
            # the first build binds the connection to its pod; the long one, started while
            # that pod's only slot is taken, runs on the other pod
            first_build = asyncio.create_task(build(pool, 0, seconds=1.0, t=bound))
            await pool.until(lambda: len(pool.gw.ledger.loads()) == 1)
            victim = next(iter(pool.gw.ledger.loads()))
            other = next(p.name for p in pool.controller.active() if p.name != victim)
            long_build = asyncio.create_task(build(pool, 1, seconds=10))
            await pool.until(lambda: pool.gw.ledger.loads().get(other) == 1)
            first = await first_build
            assert first.ok and first.replica == victim, first.error

            def freeze_at_drain(snapshot: Snapshot) -> None:
                replica = snapshot.by_id.get(victim)
                if replica is not None and replica.draining and not frozen:
                    os.kill(apiserver, signal.SIGSTOP)  # in the scaler's own loop turn
                    frozen.append(victim)

            pool.gw.registry.subscribe(freeze_at_drain)
            try:
                await pool.until(lambda: bool(frozen), timeout=30)
                # the bound connection's next build goes to its pod all the same
                second = asyncio.create_task(build(pool, 2, seconds=1.0, t=bound))
                await pool.until(lambda: pool.gw.ledger.loads().get(victim) == 1)
            finally:
                os.kill(apiserver, signal.SIGCONT)
            # the scaler looks again before lowering the count: the victim is spared
            await pool.until(lambda: not pool.gw.registry.snapshot.by_id[victim].draining
                             and pool.controller.pods[victim].cost == BUSY_COST)
            out = await second
            assert out.ok, out.error
            assert out.replica == victim and victim not in pool.controller.deleted
            assert (await long_build).ok
            ended = next(r for r in pool.gw.ledger.finished() if r.ref == out.ref).finished
            assert ended is not None
            downs = [t for t, d, _a, _b in pool.gw.scalers["default"].events if d == "down"]
            assert all(t > ended for t in downs), (downs, ended)  # none while it ran
        finally:
            await bound.close()


async def test_builds_flow_through_an_api_outage_and_the_pods_converge_after(
        kube_cluster: kube.KubeCluster) -> None:
    async with kube_pool(kube_cluster, "--max-builds", "1", replicas=2) as pool:
        watch = pool.gw.watches["default"]
        await pool.until(lambda: len(pool.gw.registry.snapshot.placeable()) == 2)
        restarts = pool.gw.metrics.watch_restarts
        errors_before = restarts.labels("default", "error")._value.get()
        gone_before = restarts.labels("default", "gone")._value.get()
        async with kube.outage(kube_cluster):
            # several failed watch cycles, and the gateway says the API is down
            await pool.until(lambda: restarts.labels("default", "error")._value.get()
                             >= errors_before + 3, timeout=30)
            assert pool.gw.kube is not None and not pool.gw.kube.health.up
            assert pool.gw.metrics.kube_api_up._value.get() == 0
            assert (await api_status(pool.gw))["kubernetes"]["api"] == "unreachable"
            outs = await asyncio.gather(*(build(pool, i, seconds=0.1) for i in range(4)))
            assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
            # As after a partition long enough for the history to be compacted past it: the
            # watch resumes from a resourceVersion the API server no longer has.
            watch.resource_version = "1"
        # back: 410 Gone, the pods are listed again, and the change made since is seen
        await pool.controller.scale(3)
        await pool.until(lambda: len(pool.gw.registry.snapshot.placeable()) == 3, timeout=30)
        assert pool.gw.kube is not None and pool.gw.kube.health.up
        assert set(watch.pods) == set(pool.controller.pods)
        assert restarts.labels("default", "gone")._value.get() == gone_before + 1
        out = await build(pool, 9)
        assert out.ok, out.error
        print(f"\noutage: watch restarts error +"
              f"{restarts.labels('default', 'error')._value.get() - errors_before:.0f}, "
              f"gone +{restarts.labels('default', 'gone')._value.get() - gone_before:.0f}")



async def api_status(gw: Gateway) -> dict[str, Any]:
    assert gw.admin is not None
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{gw.admin.port}/api/status") as response:
        document: dict[str, Any] = await response.json()
        return document


async def test_in_cluster_the_service_account_and_its_namespace_are_used(
        kube_cluster: kube.KubeCluster) -> None:
    async with kube_pool(kube_cluster, replicas=1, in_cluster=True) as pool:
        await pool.until(lambda: len(pool.gw.registry.snapshot.placeable()) == 1)
        assert pool.gw.watches["default"].namespace == pool.namespace  # from the pod's file
        out = await build(pool, 0)
        assert out.ok, out.error
        assert out.replica in pool.controller.pods


async def test_a_pod_that_turns_not_ready_finishes_its_build_and_takes_no_new_one(
        kube_cluster: kube.KubeCluster) -> None:
    async with kube_pool(kube_cluster, replicas=2) as pool:
        await pool.until(lambda: len(pool.gw.registry.snapshot.placeable()) == 2)
        running = asyncio.create_task(build(pool, 0, seconds=3))
        await pool.until(lambda: len(pool.gw.ledger.loads()) == 1)
        leaving = next(iter(pool.gw.ledger.loads()))
        await pool.controller.set_ready(leaving, False)
        await pool.until(lambda: not pool.gw.registry.snapshot.by_id[leaving].placeable)
        later = await asyncio.gather(*(build(pool, i) for i in range(1, 7)))
        assert all(o.ok for o in later), [o.error for o in later if not o.ok]
        assert {o.replica for o in later} == set(pool.gw.registry.snapshot.placeable())
        assert leaving not in {o.replica for o in later}
        out = await running
        assert out.ok and out.replica == leaving, out.error


async def test_two_pools_each_scale_their_own_deployment_from_zero(
        kube_cluster: kube.KubeCluster, tmp_path: Path) -> None:
    """One Deployment per CPU architecture, served as two pools (the buildx builder with a
    node per platform): each pool's builds start and run on its own Deployment's pods."""
    arm = f"{DEPLOYMENT}-arm64"
    admin = await kube.api_client(kube_cluster, "admin")
    namespace = await kube.new_namespace(admin)
    docs = list(yaml.safe_load_all(rbac()))
    for doc in docs:  # the Role names every scaled Deployment, as the manifest says
        for rule in doc.get("rules", ()):
            if "resourceNames" in rule:
                rule["resourceNames"].append(arm)
    await kube.apply_rbac(kube_cluster, namespace, yaml.safe_dump_all(docs))
    fakes: dict[str, FakeReplica] = {}

    async def start_replica(pod: str, ip: str, port: int) -> None:
        fakes[pod] = FakeReplica(pod)
        await fakes[pod].start(ip, port)

    async def stop_replica(pod: str) -> None:
        await fakes[pod].stop(grace=0)

    controllers = [await kube.TestController.start(
        admin, namespace, name, port=kube.free_port(), start_replica=start_replica,
        stop_replica=stop_replica) for name in (DEPLOYMENT, arm)]
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump({"pools": [
        {"name": "arm64", "kube-deployment": arm, "authority": ["arm64.builders.example"],
         "max-replicas": 2}]}))
    try:
        async with running_gateway(
                [], "--config", str(config_file), "--kubeconfig", str(kube_cluster.kubeconfig),
                "--kube-context", "gateway", "--kube-namespace", namespace,
                "--kube-deployment", DEPLOYMENT, "--kube-port", "buildkitd",
                *scaling(window="60s", max_replicas=2)) as gw:
            port = gateway_port(gw)

            async def build_on(authority: str | None, i: int) -> buildflow.BuildOutcome:
                t = await connect("grpc-go", port, authority=authority)
                try:
                    return await buildflow.build(t, context_dir=f"/src/{i}", node_id=node_id(),
                                                 timeout=60)
                finally:
                    await t.close()

            outs = await asyncio.gather(*(build_on(None, i) for i in range(3)),
                                        *(build_on("arm64.builders.example", i)
                                          for i in range(3, 6)))
            assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
            assert {o.replica for o in outs[:3]} <= set(controllers[0].ips)
            assert {o.replica for o in outs[3:]} <= set(controllers[1].ips)
            assert [c.spec_replicas for c in controllers] == [2, 2]
            assert set(gw.scalers) == {"default", "arm64"}
    finally:
        for controller in controllers:
            await controller.close()
        await admin.close()
