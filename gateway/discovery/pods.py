"""A pod as the gateway sees it (pure: plain API dicts in, frozen views out).

A pod is a replica when it has an IP, buildkitd's port resolves (a number, or a container
port name) and it has not finished (Succeeded or Failed, as evicted pods are); it takes builds
only while its Ready condition is true and it has no deletionTimestamp, and no new build while
it carries the scale-down victim's deletion cost (whichever gateway scales set it: so every
gateway stops placing on a victim). The replica id is the pod name, so every gateway builds the
same ring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.replicas.registry import Replica
from gateway.scaling.decision import VICTIM_COST

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    ip: str  # empty until the pod has one
    port: int | None  # buildkitd's port, None if the named port is not in the pod
    ready: bool  # condition Ready is True
    terminating: bool  # deletionTimestamp set
    created: str  # creationTimestamp, RFC 3339
    cost: int | None  # the pod-deletion-cost annotation, if set and an integer
    finished: bool = False  # phase Succeeded or Failed (evicted): it runs nothing any more

    def replica(self, pool: str) -> Replica | None:
        if not self.ip or self.port is None or self.finished:
            return None
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return Replica(id=self.name, address=f"tcp://{host}:{self.port}", pool=pool,
                       pod_ready=self.ready, terminating=self.terminating,
                       victim=self.cost == VICTIM_COST)


def pod_view(obj: Mapping[str, Any], port: int | str) -> PodView:
    """The view of one pod object (as the API serves it, JSON decoded)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ())
    annotations = meta.get("annotations") or {}
    try:
        cost: int | None = int(annotations[DELETION_COST])
    except (KeyError, ValueError):
        cost = None
    return PodView(
        name=str(meta.get("name", "")),
        ip=str(status.get("podIP") or ""),
        port=_port(obj.get("spec") or {}, port),
        ready=ready,
        terminating=meta.get("deletionTimestamp") is not None,
        created=str(meta.get("creationTimestamp") or ""),
        cost=cost,
        finished=status.get("phase") in ("Succeeded", "Failed"),
    )


def _port(spec: Mapping[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for container in spec.get("containers") or ():
        for p in container.get("ports") or ():
            if p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None
