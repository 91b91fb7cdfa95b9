"""The gateway's state as plain data: the /api/status document and the metrics' gauges.

Design: one read of the hub's current state (registry snapshot, ledger, admission queues,
connections) turned into JSON-able dicts; the HTML page, the `status` subcommand and the
Prometheus gauges all show this same view. Read-only; no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.metrics import State
from gateway.replicas.registry import Replica

if TYPE_CHECKING:
    from gateway.relay.hub import Hub

RECENT = 50


def replica_state(replica: Replica) -> str:
    """One of metrics.REPLICA_STATES: draining covers scale-down victims and terminating pods."""
    if replica.draining or replica.leaving or replica.terminating:
        return "draining"
    if replica.ejected:
        return "ejected"
    return "ready" if replica.serving else "not_ready"


def document(hub: Hub, *, version: str, started: float, now: float,
             wall: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The /api/status document. `now` is the loop clock, `wall` Unix time. `extra` holds the
    Kubernetes parts: "kubernetes" (API reachability), "election" (which gateway scales), "scaling"
    and "discovery" by pool."""
    extra = extra or {}
    snap = hub.registry.snapshot
    active: dict[str, list[dict[str, Any]]] = {}
    for rec in hub.ledger.active():
        active.setdefault(rec.replica, []).append({
            "ref": rec.ref, "internal": rec.internal, "age_s": round(now - rec.started, 3)})
    pools = []
    for name, state in hub.pools.items():
        settings = state.settings
        replicas = []
        for r in snap.replicas:
            if r.pool != name:
                continue
            builds = active.get(r.id, [])
            replicas.append({
                "id": r.id,
                "address": r.address,
                "state": replica_state(r),
                "reason": r.reason,
                "active_builds": sum(1 for b in builds if not b["internal"]),
                "internal_builds": sum(1 for b in builds if b["internal"]),
                "slots": settings.max_builds,
                "builds": builds,
            })
        queue = [{"ref": w.ref, "position": i, "age_s": round(now - w.enqueued, 3),
                  "internal": w.internal, "target": w.target, "tenant": w.tenant}
                 for i, w in enumerate(state.queue)]
        pools.append({
            "name": name,
            "loadbalance": settings.loadbalance,
            "max_builds": settings.max_builds,
            "max_queue": settings.max_queue,
            "queue_timeout_s": settings.queue_timeout,
            "authorities": list(settings.authorities),
            "replicas": replicas,
            "queue": queue,
            "starting": hub.starting.get(name, 0),
            "scaling": extra.get("scaling", {}).get(name),
            "discovery": extra.get("discovery", {}).get(name),
        })
    pool_of = {r.id: r.pool for r in snap.replicas}
    recent = [{"ref": rec.ref, "pool": pool_of.get(rec.replica, ""), "replica": rec.replica,
               "internal": rec.internal, "finished_ago_s": round(now - (rec.finished or now), 3),
               "duration_s": round(rec.duration or 0.0, 3), "result": rec.result}
              for rec in list(hub.ledger.finished())[-RECENT:]][::-1]
    return {
        "gateway": {
            "version": version,
            "uptime_s": round(wall - started, 3),
            "ready": hub.ready(),
            "draining": hub.draining,
            "clients": len(hub.clients),
            "client_identities": _identities(hub),
            "streams": dict(sorted(hub.streams.items())),
        },
        "kubernetes": extra.get("kubernetes"),
        "election": extra.get("election"),
        "pools": pools,
        "recent_builds": recent,
    }


def _identities(hub: Hub, most: int = 50) -> dict[str, int]:
    """Open connections by client: the certificate's name (mTLS), else the address."""
    counts: dict[str, int] = {}
    for conn in hub.clients:
        who = conn.identity or conn.peer or conn.listener
        counts[who] = counts.get(who, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:most])


def gauges(hub: Hub) -> State:
    """The state the Prometheus gauges show."""
    snap = hub.registry.snapshot
    pool_of = {r.id: r.pool for r in snap.replicas}
    active = {(r.pool, r.id, internal): 0 for r in snap.replicas for internal in (False, True)}
    for rec in hub.ledger.active():
        key = (pool_of.get(rec.replica, ""), rec.replica, rec.internal)
        active[key] = active.get(key, 0) + 1
    return State(
        active_builds=active,
        queued={name: len(state.queue) for name, state in hub.pools.items()},
        replicas={(r.pool, r.id): replica_state(r) for r in snap.replicas},
        clients=len(hub.clients),
        streams={k: v for k, v in hub.streams.items() if v},
        ready=hub.ready(),
        draining=hub.draining,
        slots={(r.pool, r.id): hub.pools[r.pool].settings.max_builds
               for r in snap.replicas if r.pool in hub.pools},
    )
