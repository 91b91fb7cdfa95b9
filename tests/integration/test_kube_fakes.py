"""tests/fakes/kube.py against the real kube-apiserver: TestController scales pods up and down
(in the ReplicaSet controller's order, with graceful deletion), pauses, and survives an
apiserver outage; apply_rbac grants the 'gateway' user exactly what the manifest says.

Replicas are plain TCP listeners on the pod's loopback IP that accept and close.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import aiohttp
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from tests.fakes import kube
from tests.fakes.kube import KubeCluster, PodView, TestController

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")


@pytest.fixture
async def admin(kube_cluster: KubeCluster) -> AsyncIterator[ApiClient]:
    api = await kube.api_client(kube_cluster)
    yield api
    await api.close()


class Listeners:
    """start_replica/stop_replica stand-ins: a TCP server per pod that accepts and closes."""

    def __init__(self) -> None:
        self.servers: dict[str, asyncio.Server] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self.stopped: list[str] = []
        self.gate = asyncio.Event()  # stop_replica waits for it: the pod stays terminating
        self.gate.set()

    async def start(self, name: str, ip: str, port: int) -> None:
        async def close(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        self.servers[name] = await asyncio.start_server(close, ip, port)
        self.addresses[name] = (ip, port)

    async def stop(self, name: str) -> None:
        async with asyncio.timeout(20):
            await self.gate.wait()
        server = self.servers.pop(name)
        server.close()
        await server.wait_closed()
        self.stopped.append(name)


@pytest.fixture
async def controller(admin: ApiClient) -> AsyncIterator[tuple[TestController, Listeners]]:
    listeners = Listeners()
    namespace = await kube.new_namespace(admin)
    async with await TestController.start(
            admin, namespace, "buildkitd", port=kube.free_port(),
            start_replica=listeners.start, stop_replica=listeners.stop) as ctl:
        yield ctl, listeners


def converged(replicas: int) -> Callable[[TestController], bool]:
    def check(c: TestController) -> bool:
        active = c.active()
        return (len(active) == replicas == len(c.pods)
                and all(v.ip and v.ready for v in active))
    check.__name__ = f"{replicas} ready pods and no others"
    return check


async def api_pods(admin: ApiClient, namespace: str) -> list[client.V1Pod]:
    return (await client.CoreV1Api(admin).list_namespaced_pod(namespace)).items


async def test_scale_up_creates_ready_pods_with_distinct_ips(
        controller: tuple[TestController, Listeners], admin: ApiClient) -> None:
    ctl, listeners = controller
    generation = await ctl.scale(3)
    await ctl.wait_for(converged(3), 20)
    await ctl.wait_for(lambda c: c.observed_generation >= generation, 10)

    pods = await api_pods(admin, ctl.namespace)
    assert sorted(p.metadata.name for p in pods) == sorted(ctl.pods)
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 3 and all(ip.startswith("127.") for ip in ips)
    for pod in pods:
        assert pod.metadata.name.startswith("buildkitd-") and len(pod.metadata.name) == 15
        assert pod.metadata.labels == {"app": "buildkitd"}
        assert pod.spec.node_name == "node-1"
        [container] = pod.spec.containers
        assert (container.name, container.image, container.ports[0].name) == (
            "buildkitd", "moby/buildkit:test", "buildkitd")
        assert pod.status.phase == "Running"
        assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
        assert ctl.ready_at[pod.metadata.name] > 0
        ip, port = listeners.addresses[pod.metadata.name]
        assert (ip, port) == (pod.status.pod_ip, container.ports[0].container_port)
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(ip, port)
        writer.close()

    deployment = await client.AppsV1Api(admin).read_namespaced_deployment_status(
        "buildkitd", ctl.namespace)
    status = deployment.status
    assert (status.replicas, status.ready_replicas, status.available_replicas,
            status.updated_replicas, status.observed_generation) == (3, 3, 3, 3, generation)


async def test_scale_down_order_and_graceful_deletion(
        controller: tuple[TestController, Listeners], admin: ApiClient) -> None:
    ctl, listeners = controller
    await ctl.scale(3)
    await ctl.wait_for(converged(3), 20)
    unready, costly, cheap = sorted(ctl.pods)
    await ctl.set_ready(unready, False)
    await client.CoreV1Api(admin).patch_namespaced_pod(costly, ctl.namespace, {
        "metadata": {"annotations": {kube.COST_ANNOTATION: "10"}}})
    await ctl.wait_for(lambda c: c.pods[costly].cost == 10 and not c.pods[unready].ready, 10)

    listeners.gate.clear()  # the "kubelet" cannot finish: pods stay terminating
    await ctl.scale(1)
    await ctl.wait_for(lambda c: [v.name for v in c.active()] == [costly]
                       and c.pods[unready].terminating and c.pods[cheap].terminating, 10)
    assert ctl.deleted == [unready, cheap]
    pods = {p.metadata.name: p for p in await api_pods(admin, ctl.namespace)}
    assert set(pods) == {unready, costly, cheap}
    for name in (unready, cheap):  # graceful deletion: the pod stays, marked
        assert pods[name].metadata.deletion_timestamp is not None
        assert pods[name].metadata.deletion_grace_period_seconds == 30

    listeners.gate.set()
    await ctl.wait_for(converged(1), 10)
    assert sorted(listeners.stopped) == sorted([unready, cheap])
    assert [p.metadata.name for p in await api_pods(admin, ctl.namespace)] == [costly]
    assert list(listeners.servers) == [costly]


def test_deletion_order_breaks_ties_like_the_replicaset_controller() -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)

    def view(name: str, *, ready: bool = True, cost: int = 0, age: int = 0) -> PodView:
        return PodView(name, "127.0.0.1", ready, False, cost, t0 - timedelta(seconds=age))

    pods = [view("old", age=10), view("new"), view("new-b"), view("rich", cost=5),
            view("poor", cost=-5, age=99), view("sick", ready=False, cost=100)]
    assert [p.name for p in kube.deletion_order(pods)] == [
        "sick", "poor", "new", "new-b", "old", "rich"]


async def test_pause_holds_creation_and_deletion(
        controller: tuple[TestController, Listeners]) -> None:
    ctl, _ = controller
    await ctl.scale(1)
    await ctl.wait_for(converged(1), 20)

    await ctl.pause()
    generation = await ctl.scale(3)
    await ctl.wait_for(lambda c: c.observed_generation >= generation, 10)
    assert len(ctl.pods) == 1  # seen, not acted on
    ctl.resume()
    await ctl.wait_for(converged(3), 20)

    await ctl.pause()
    generation = await ctl.scale(0)
    await ctl.wait_for(lambda c: c.observed_generation >= generation, 10)
    assert len(ctl.active()) == 3 and ctl.deleted == []
    ctl.resume()
    await ctl.wait_for(converged(0), 20)
    assert len(ctl.deleted) == 3


async def test_controller_survives_an_apiserver_outage(
        kube_cluster: KubeCluster, controller: tuple[TestController, Listeners]) -> None:
    ctl, _ = controller
    await ctl.scale(1)
    await ctl.wait_for(converged(1), 20)
    errors = len(ctl.errors)

    async with kube.outage(kube_cluster):
        await ctl.wait_for(lambda c: len(c.errors) > errors, 10)  # it noticed
        with pytest.raises(aiohttp.ClientError):
            await ctl.scale(2)

    generation = await ctl.scale(2)
    await ctl.wait_for(converged(2), 30)
    await ctl.wait_for(lambda c: c.observed_generation >= generation, 10)
    assert ctl.spec_replicas == 2


async def until_allowed(call: Callable[[], Awaitable[T]], timeout: float = 5) -> T:
    """The RBAC authorizer sees a new grant through its own watch, a moment after the write
    was answered; nothing to wait on, so retry a 403 until the deadline."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await call()
            except ApiException as exc:
                if exc.status != 403:
                    raise
            await asyncio.sleep(0.05)  # poll pacing, not synchronisation


async def test_apply_rbac_grants_the_gateway_user(
        kube_cluster: KubeCluster, admin: ApiClient) -> None:
    namespace, other = await kube.new_namespace(admin), await kube.new_namespace(admin)
    manifest = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: buildkit-gateway}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: gateway}
rules:
- {apiGroups: [""], resources: [pods], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: gateway}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: gateway}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: gateway}
- {kind: ServiceAccount, name: buildkit-gateway}
"""
    await kube.apply_rbac(kube_cluster, namespace, manifest)
    gateway = await kube.api_client(kube_cluster, "gateway")
    try:
        core = client.CoreV1Api(gateway)
        with pytest.raises(ApiException) as denied:
            await core.list_namespaced_pod(namespace)
        assert denied.value.status == 403
        # replacing: the same manifest with list allowed too
        await kube.apply_rbac(kube_cluster, namespace, manifest.replace("[get]", "[get, list]"))
        assert (await until_allowed(lambda: core.list_namespaced_pod(namespace))).items == []
        with pytest.raises(ApiException) as denied:
            await core.list_namespaced_pod(other)
        assert denied.value.status == 403
        binding = await client.RbacAuthorizationV1Api(admin).read_namespaced_role_binding(
            "gateway", namespace)
        assert binding.subjects[1].namespace == namespace
    finally:
        await gateway.close()
