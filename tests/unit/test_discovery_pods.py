"""Pods as replicas: IP, port (number or name), Ready, terminating, deletion cost."""

from __future__ import annotations

from typing import Any

from gateway.admission.progress import wait_label
from gateway.discovery.pods import DELETION_COST, pod_view


def pod(*, ip: str = "10.0.0.7", ready: str = "True", deleting: bool = False,
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "buildkitd-abc12", "creationTimestamp": "2026-12-07T00:00:00Z",
                     "annotations": annotations or {},
                     **({"deletionTimestamp": "2026-12-07T00:01:00Z"} if deleting else {})},
        "spec": {"containers": [{"name": "buildkitd",
                                 "ports": [{"name": "buildkitd", "containerPort": 1234}]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
    }


def test_a_ready_pod_is_a_placeable_replica_named_after_the_pod() -> None:
    view = pod_view(pod(), 1234)
    replica = view.replica("default")
    assert replica is not None
    assert (replica.id, replica.address, replica.pod_ready, replica.terminating) == (
        "buildkitd-abc12", "tcp://10.0.0.7:1234", True, False)


def test_named_ports_resolve_from_the_containers() -> None:
    assert pod_view(pod(), "buildkitd").port == 1234
    assert pod_view(pod(), "other").replica("default") is None


def test_not_ready_terminating_and_ipless_pods() -> None:
    assert pod_view(pod(ready="False"), 1234).ready is False
    assert pod_view(pod(deleting=True), 1234).terminating is True
    assert pod_view(pod(ip=""), 1234).replica("default") is None
    v6 = pod_view(pod(ip="fd00::7"), 1234).replica("default")
    assert v6 is not None and v6.address == "tcp://[fd00::7]:1234"


def test_the_deletion_cost_is_read_when_it_is_a_number() -> None:
    assert pod_view(pod(annotations={DELETION_COST: "-1000"}), 1).cost == -1000
    assert pod_view(pod(annotations={DELETION_COST: "lots"}), 1).cost is None


def test_the_wait_names_replicas_being_started_for_an_empty_pool() -> None:
    assert wait_label(ahead=2, starting=0, serving=1) == "2 ahead"
    assert wait_label(ahead=0, starting=1, serving=0) == "starting 1 replica"
    assert wait_label(ahead=3, starting=2, serving=0) == "starting 2 replicas, 3 ahead"
    assert wait_label(ahead=0, starting=2, serving=1) == "0 ahead"
