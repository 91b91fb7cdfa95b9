"""The scaler's actuator against a fake Kubernetes API: the order of its steps and the races."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from gateway.config import KubeSettings, KubeWorkload, ScalingSettings
from gateway.discovery.pods import DELETION_COST, PodView
from gateway.metrics import Metrics
from gateway.replicas.registry import Registry, Replica
from gateway.scaling import decision
from gateway.scaling.scaler import Demand, PoolScaler


class FakeApi:
    """The scale subresource and pod patches; `during_scale` runs inside the scale PATCH."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.scale_patches: list[int] = []
        self.pod_patches: list[tuple[str, str | None]] = []
        self.during_scale: Callable[[], None] = lambda: None
        self.fail_scale = False

    async def read_namespaced_deployment_scale(self, name: str, ns: str) -> Any:
        return types.SimpleNamespace(spec=types.SimpleNamespace(replicas=self.replicas))

    async def patch_namespaced_deployment_scale(self, name: str, ns: str, body: Any) -> None:
        await asyncio.sleep(0)  # a round trip: other work runs meanwhile
        self.during_scale()
        if self.fail_scale:
            raise ApiException(status=503, reason="unavailable")
        self.replicas = body["spec"]["replicas"]
        self.scale_patches.append(self.replicas)

    async def patch_namespaced_pod(self, name: str, ns: str, body: Any) -> None:
        self.pod_patches.append((name, body["metadata"]["annotations"][DELETION_COST]))


def pod(name: str, i: int, *, finished: bool = False) -> PodView:
    return PodView(name, f"10.0.0.{i}", 1234, True, False, f"2026-12-07T00:00:0{i}Z", None,
                   finished=finished)


def scaler(pods: dict[str, PodView], busy: set[str], api: FakeApi,
           registry: Registry) -> PoolScaler:
    kube = types.SimpleNamespace(api=None, namespace="ns", health=types.SimpleNamespace(
        succeeded=lambda: None, failed=lambda *a: None, up=True))
    s = PoolScaler(pool="p", policy=ScalingSettings(0, 5, 1, 0.0),
                   workload=KubeWorkload("ns", "buildkitd", "", 1234),
                   kube=kube,  # type: ignore[arg-type]
                   settings=KubeSettings("", ""), registry=registry, pods=lambda: pods,
                   synced=asyncio.Event(),
                   demand=lambda _pool: Demand(len(busy), 0, frozenset(busy)),
                   metrics=Metrics(CollectorRegistry(), version="test"),
                   on_starting=lambda _pool, _n: None)
    s._apps = api  # type: ignore[assignment]
    s._core = api  # type: ignore[assignment]
    return s


def registry_of(pods: dict[str, PodView]) -> Registry:
    return Registry([Replica(id=n, address=f"tcp://{p.ip}:1234", pool="p", ready=True,
                             reason="") for n, p in pods.items()])


async def test_victims_take_nothing_new_while_the_count_is_being_lowered() -> None:
    """A bound build cannot land on a victim once the scale PATCH is under way: the ReplicaSet
    controller may delete it as soon as the count is lower."""
    pods = {n: pod(n, i) for i, n in enumerate("ABC")}
    registry = registry_of(pods)
    api = FakeApi(3)
    s = scaler(pods, {"A"}, api, registry)
    seen: list[tuple[bool, bool]] = []
    api.during_scale = lambda: seen.extend(
        (registry.snapshot.by_id[v].serving, registry.snapshot.by_id[v].leaving)
        for v in ("B", "C"))
    await s._reconcile()
    assert api.scale_patches == [1]
    assert seen == [(False, True), (False, True)]  # neither victim took anything then
    assert dict(api.pod_patches) == {"A": str(decision.BUSY_COST),
                                     "B": str(decision.VICTIM_COST),
                                     "C": str(decision.VICTIM_COST)}


async def test_no_victims_when_the_count_does_not_go_down() -> None:
    """Surge or finished pods beside a steady count are nobody's victims."""
    pods = {n: pod(n, i) for i, n in enumerate("ABC")}
    pods["D"] = pod("D", 4, finished=True)  # evicted: Failed
    registry = registry_of(pods)
    api = FakeApi(3)
    s = scaler(pods, {"A", "B", "C"}, api, registry)
    await s._reconcile()
    assert api.scale_patches == [] and api.pod_patches == [] and not s.victims
    assert not any(r.draining for r in registry.snapshot.replicas)


async def test_a_failed_scale_down_leaves_victims_draining_and_taking_them_back_resets_costs(
        ) -> None:
    pods = {n: pod(n, i) for i, n in enumerate("AB")}
    registry = registry_of(pods)
    api = FakeApi(2)
    busy = {"A"}
    s = scaler(pods, busy, api, registry)
    api.fail_scale = True
    with pytest.raises(ApiException):
        await s._reconcile()
    b = registry.snapshot.by_id["B"]
    assert (b.draining, b.leaving) == (True, False) and s.victims == {"B"}
    # demand comes back before the next try: B is taken back and loses its low cost
    busy.add("X")  # a second build (queued, say): two replicas wanted again
    api.fail_scale = False
    pods["B"] = PodView("B", "10.0.0.1", 1234, True, False, "2026-12-07T00:00:01Z",
                        decision.VICTIM_COST)
    await s._reconcile()
    assert not registry.snapshot.by_id["B"].draining and not s.victims
    assert ("B", None) in api.pod_patches  # the annotation is removed
