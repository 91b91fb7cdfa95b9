"""`buildkit-gateway status`'s text: the Kubernetes API line and a pool's scaling lines.

The canned /api/status documents here are shaped like admin/status.py's `document` with the
Kubernetes parts of app.py's `_status` (ApiHealth.document, Scaler.document, the pod watch's
fields); the status page test (tests/integration/test_status_page.py) renders the same ones.
"""

from __future__ import annotations

import copy
from typing import Any

from gateway.admin import table


def _replica(pod: str, ip: str, state: str, reason: str = "", builds: int = 0) -> dict[str, Any]:
    return {"id": pod, "address": f"tcp://{ip}:1234", "state": state, "reason": reason,
            "active_builds": builds, "internal_builds": 0, "slots": 2,
            "builds": [{"ref": f"ref{pod[-1]}{i}", "internal": False, "age_s": 3.5 + i}
                       for i in range(builds)]}


def _pool(name: str, replicas: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "loadbalance": "sticky", "max_builds": 2, "max_queue": 100,
            "queue_timeout_s": 600.0, "authorities": [], "replicas": replicas, "queue": [],
            "starting": 0, "scaling": None, "discovery": None}


def kube_document() -> dict[str, Any]:
    """A gateway discovering two pools in Kubernetes whose API is down: "default" scaled by
    the gateway (scaled down from 4 to 3 with one victim draining and one pod leaving, now
    wanting 5 again: 2 starting), "arm" discovered only (not scaled)."""
    default = _pool("default", [
        _replica("buildkitd-7d9f-a", "10.1.0.11", "ready", builds=2),
        _replica("buildkitd-7d9f-b", "10.1.0.12", "ready", builds=1),
        _replica("buildkitd-7d9f-c", "10.1.0.13", "draining"),
        _replica("buildkitd-7d9f-d", "10.1.0.14", "draining"),
    ])
    default.update(starting=2, scaling={
        "deployment": "builds/buildkitd", "min": 1, "max": 10, "target_builds": 2,
        "scale_down_window_s": 300.0, "desired": 5, "current": 3,
        "victims": ["buildkitd-7d9f-c"], "leaving": ["buildkitd-7d9f-d"],
        "events": [{"ago_s": 12.4, "direction": "down", "from": 4, "to": 3},
                   {"ago_s": 330.0, "direction": "up", "from": 1, "to": 4},
                   {"ago_s": 3725.0, "direction": "up", "from": 0, "to": 1}],
    }, discovery={"namespace": "builds", "selector": "app=buildkitd", "pods": 4,
                  "resource_version": "48213"})
    arm = _pool("arm", [_replica("buildkitd-arm-0", "10.1.1.5", "not_ready",
                                 reason="connection refused")])
    arm["discovery"] = {"namespace": "builds", "selector": "app=buildkitd-arm", "pods": 1,
                        "resource_version": "48190"}
    return {
        "gateway": {"version": "1.4.0", "uptime_s": 7260.5, "ready": True, "draining": False,
                    "clients": 3, "streams": {"control": 3, "session": 2}},
        "kubernetes": {"api": "unreachable", "for_s": 42.0,
                       "error": "list pods: HTTP 503: Service Unavailable"},
        "pools": [default, arm],
        "recent_builds": [{"ref": "quickref1", "pool": "default", "replica": "buildkitd-7d9f-a",
                           "internal": False, "finished_ago_s": 20.0, "duration_s": 4.2,
                           "result": "ok"}],
    }


def plain_document() -> dict[str, Any]:
    """The same gateway without Kubernetes: static replicas, no Kubernetes parts."""
    doc = kube_document()
    doc["kubernetes"] = None
    for pool in doc["pools"]:
        pool.update(starting=0, scaling=None, discovery=None)
        for r in pool["replicas"]:
            if r["state"] == "draining":
                r["state"] = "ready"
    return doc


KUBE_TEXT = """\
buildkit-gateway 1.4.0  ready  up 7260s  clients 3
kubernetes api UNREACHABLE for 42s: list pods: HTTP 503: Service Unavailable

pool default (sticky, 2 slots per replica, 0 waiting)
deployment builds/buildkitd: current 3, desired 5 (1..10, target 2 builds per replica), \
starting 2, draining: buildkitd-7d9f-c, leaving: buildkitd-7d9f-d
scale events (scale-down window 5m00s): down 4->3 12s ago, up 1->4 5m30s ago, up 0->1 1h02m ago
pods: 4 in namespace builds matching app=buildkitd (resource version 48213)
REPLICA           STATE     BUILDS  ADDRESS               REASON
buildkitd-7d9f-a  ready     2/2     tcp://10.1.0.11:1234
buildkitd-7d9f-b  ready     1/2     tcp://10.1.0.12:1234
buildkitd-7d9f-c  draining  0/2     tcp://10.1.0.13:1234
buildkitd-7d9f-d  draining  0/2     tcp://10.1.0.14:1234

pool arm (sticky, 2 slots per replica, 0 waiting)
pods: 1 in namespace builds matching app=buildkitd-arm (resource version 48190)
REPLICA          STATE      BUILDS  ADDRESS              REASON
buildkitd-arm-0  not_ready  0/2     tcp://10.1.1.5:1234  connection refused

RECENT BUILD  POOL     REPLICA           DURATION  RESULT
quickref1     default  buildkitd-7d9f-a  4.2s      ok
"""


def test_kubernetes_and_scaling_lines() -> None:
    assert table.render(kube_document()) == KUBE_TEXT


def test_without_kubernetes_no_such_lines() -> None:
    text = table.render(plain_document())
    assert text.splitlines()[:3] == [
        "buildkit-gateway 1.4.0  ready  up 7260s  clients 3", "",
        "pool default (sticky, 2 slots per replica, 0 waiting)"]
    for word in ("kubernetes", "deployment", "scale events", "pods:", "draining", "starting"):
        assert word not in text, (word, text)


def test_api_ok_and_a_scaler_that_has_not_read_the_deployment_yet() -> None:
    doc = kube_document()
    doc["kubernetes"] = {"api": "ok", "for_s": None, "error": ""}
    scaling = doc["pools"][0]["scaling"]
    scaling.update(current=None, desired=None, victims=[], leaving=[], events=[])
    doc["pools"][0]["starting"] = 0
    lines = table.render(doc).splitlines()
    assert lines[1] == "kubernetes api ok"
    assert lines[4:6] == [
        "deployment builds/buildkitd: current -, desired - (1..10, target 2 builds per replica), "
        "starting 0",
        "scale events (scale-down window 5m00s): none yet"]
    ok_since = copy.deepcopy(doc)
    ok_since["kubernetes"]["for_s"] = 3.25
    assert table.render(ok_since).splitlines()[1] == "kubernetes api ok for 3.2s"


def test_durations() -> None:
    assert [table._dur(s) for s in (None, 0.0, 9.94, 10.0, 59.9, 60.0, 302.0, 3600.0,
                                    3725.0, 86400.0, 93600.0)] == [
        "-", "0.0s", "9.9s", "10s", "59s", "1m00s", "5m02s", "1h00m", "1h02m", "1d00h",
        "1d02h"]
