"""The actuator: turns a pool's demand into its Deployment's replica count (scale subresource).

Design: `poke()` is called synchronously wherever demand or the pods change (a build queued,
placed or finished; a pod event). It runs the pure decision at once with the count last read,
so a queue that grows is decided in the same loop turn, and wakes the actuator task; many
pokes collapse into one wake-up. The task reads the scale subresource, decides again with that
count, and carries it out:

- up: set the count;
- down (only once the decision's window allows it), in this order: choose idle victims
  (`decision.victims`), stop placing on them (`draining` in the registry, at once, before any
  I/O; a connection bound to a victim may still put its next build there), set
  `controller.kubernetes.io/pod-deletion-cost` low on them and high on busy pods, look again
  (a victim that got busy meanwhile keeps its build and is spared), mark the rest `leaving`
  (nothing new goes to them from then on, not even a bound build, since the ReplicaSet
  controller may delete them as soon as the count is lower), then lower the count: never below
  the busy replicas. No scale-down while a busy pod is not Ready (the ReplicaSet controller
  removes pods that are not Ready first, whatever their cost). Until they are leaving, victims
  that demand needs again are taken back, and lose their low cost. A leaving pod that is
  still there, not terminating, `LEAVING_GRACE` later was not the one removed (its cost was
  overridden): it is taken back;
- a timer pokes again when the window lets a lower count take effect.

Errors of the API back off and retry; the decision's state survives them. Only this module and
discovery/ talk to Kubernetes.

Among several gateways only the leader (scaling/lease.py) acts; the demand it decides on is
every gateway's (`demand` sums them). A follower's `poke` only publishes the replicas
starting (pods not serving yet), and a gateway that stops leading gives its victims back to
placement (their victim cost stays until the next leader removes it: `_stale_costs`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes_asyncio import client

from gateway.config import KubeSettings, KubeWorkload, ScalingSettings
from gateway.discovery.kube import API_ERRORS, Kube, patch_scale, read_scale
from gateway.discovery.pods import DELETION_COST, PodView
from gateway.metrics import Metrics
from gateway.replicas.registry import Registry
from gateway.scaling import decision
from gateway.scaling.decision import VICTIM_COST, Decision, Recommendations
from gateway.scaling.shared import Demand

log = logging.getLogger("gateway.scaling")

LEAVING_GRACE = 30.0
"""Seconds a victim may stay after the count was lowered before it counts as not removed."""


class PoolScaler:
    def __init__(self, *, pool: str, policy: ScalingSettings, workload: KubeWorkload,
                 kube: Kube, settings: KubeSettings, registry: Registry,
                 pods: Callable[[], dict[str, PodView]], synced: asyncio.Event,
                 demand: Callable[[str], Demand], metrics: Metrics,
                 on_starting: Callable[[str, int], None],
                 leading: Callable[[], bool] = lambda: True) -> None:
        self.pool = pool
        self.policy = policy
        self.workload = workload
        self.namespace = workload.namespace or kube.namespace
        self.kube = kube
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._pods = pods
        self._synced = synced  # the pool's pods have been listed: victims can be chosen
        self._demand = demand
        self._on_starting = on_starting
        self._leading = leading
        self._apps = client.AppsV1Api(kube.api)
        self._core = client.CoreV1Api(kube.api)
        self.recommendations = Recommendations()
        self.current: int | None = None  # the spec count last read or set
        self.last: Decision | None = None
        self.victims: set[str] = set()  # draining, the count not lowered yet
        self.leaving: dict[str, float] = {}  # the count lowered: pod -> when to take it back
        self._uncost: set[str] = set()  # former victims whose low deletion cost must go
        self.wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self.events: list[tuple[float, str, int, int]] = []  # (time, direction, from, to)

    # ---- deciding (synchronous, pure core) ----------------------------------------------

    def poke(self) -> None:
        """Demand or pods changed: decide now; wake the actuator if the count must change."""
        if not self._leading():
            if self.victims:  # leadership lost: placement gets them back
                self.step_down()
            self._publish_starting()
            return
        if self.current is None:  # not read yet: the actuator decides once it has it
            self.wake.set()
            return
        d = self._decide(self.current)
        if d.replicas != self.current or self._victims_stale():
            self.wake.set()
        self._publish_starting()

    def _decide(self, current: int) -> Decision:
        demand = self._demand(self.pool)
        loop = asyncio.get_running_loop()
        d = decision.decide(self.policy, self.recommendations, running=demand.running,
                            queued=demand.queued, busy=len(demand.busy & self._live()),
                            current=current, now=loop.time())
        self.recommendations = d.recommendations
        self.last = d
        self.metrics.scaler_desired.labels(self.pool).set(d.wanted)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if d.recheck_at is not None:
            self._timer = loop.call_at(d.recheck_at, self.poke)
        return d

    def _live(self) -> set[str]:
        """Pods that stay: not terminating and not leaving."""
        return {name for name, p in self._pods().items()
                if not p.terminating and not p.finished and name not in self.leaving}

    def _victims_stale(self) -> bool:
        return bool(self.victims - self._live()) or (
            bool(self.victims) and self.last is not None and self.current is not None
            and self.last.replicas >= self.current)

    def _view(self, busy: frozenset[str]) -> list[decision.Pod]:
        return [decision.Pod(p.name, p.ready,
                             p.terminating or p.finished or p.name in self.leaving,
                             p.created, busy=p.name in busy) for p in self._pods().values()]

    def _publish_starting(self) -> None:
        """Pods asked for that do not serve yet (the wait a queued build shows): on the
        leader from the count it set, on a follower from the pods that exist."""
        snap = self.registry.snapshot
        serving = sum(1 for r in snap.replicas if r.pool == self.pool and r.serving)
        if self._leading():
            wanted = max(self.current or 0, self.last.replicas if self.last else 0)
        else:
            wanted = len(self._live())
        starting = max(0, wanted - serving)
        self.metrics.scaler_starting.labels(self.pool).set(starting)
        self._on_starting(self.pool, starting)

    # ---- acting (the I/O) ----------------------------------------------------------------

    async def run(self) -> None:
        backoff = self.settings.backoff
        await self._synced.wait()  # never decide on pods not seen yet
        self.wake.set()  # read the count once at start
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not self._leading():
                self.current = None  # read again once leading: another gateway may set it
                self.recommendations = Recommendations()
                continue
            try:
                await self._reconcile()
                backoff = self.settings.backoff
            except API_ERRORS as exc:
                self.kube.health.failed("scale", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.backoff_max)
                self.wake.set()

    async def _reconcile(self) -> None:
        scale = await read_scale(self._apps, self.workload, self.namespace)
        self.kube.health.succeeded()
        current = int(scale.spec.replicas or 0)
        self.current = current
        self.metrics.scaler_current.labels(self.pool).set(current)
        self._expire_leaving()
        d = self._decide(current)
        busy = self._demand(self.pool).busy
        pods = self._view(busy)
        spared: set[str] = set()
        if self.workload.statefulset:
            target, chosen = self._by_ordinal(pods, d, current)
        else:
            target, chosen, spared = await self._by_cost(pods, d, current, busy)
        if target != current:
            if target < current:
                self._leave(chosen)  # from now on nothing, not even a bound build, goes there
            try:
                await patch_scale(self._apps, self.workload, self.namespace, target)
            except BaseException:
                if target < current:
                    self._stay(chosen)  # still victims: chosen again, or taken back, next time
                raise
            direction = "up" if target > current else "down"
            self.current = target
            self.metrics.scaler_current.labels(self.pool).set(target)
            self.metrics.scale_events.labels(self.pool, direction).inc()
            self.events.append((asyncio.get_running_loop().time(), direction, current, target))
            del self.events[:-50]
            log.info("scaled", extra={"pool": self.pool, "direction": direction,
                                      "from": current, "to": target, "wanted": d.wanted,
                                      "victims": ",".join(sorted(chosen))})
        # Pods that are no victims any more lose their low cost; spared ones are busy.
        uncost, self._uncost = (self._uncost | self._stale_costs()) - self.victims - set(
            self.leaving), set()
        await self._set_costs({**{name: None for name in uncost},
                               **{name: decision.BUSY_COST for name in spared}})
        self._publish_starting()

    async def _by_cost(self, pods: list[decision.Pod], d: Decision, current: int,
                       busy: frozenset[str]) -> tuple[int, set[str], set[str]]:
        """A Deployment's count and victims (removed by the ReplicaSet controller in deletion
        cost order), and the victims spared because they got a build meanwhile."""
        # Down only by idle victims, and not while a busy pod is not Ready: the ReplicaSet
        # controller removes pods that are not Ready before any deletion cost counts.
        down = d.replicas < current and not any(p.busy and not p.ready and not p.terminating
                                                for p in pods)
        chosen = set(decision.victims(pods, d.replicas, prefer=self.victims)) if down else set()
        self._drain(chosen)
        spared: set[str] = set()
        if chosen:
            await self._set_costs(decision.deletion_costs(pods, chosen))
            # Look again after the awaits: a victim that got a (bound) build keeps it.
            busy = self._demand(self.pool).busy
            spared = chosen & busy
            if spared:
                log.info("scale-down victim got busy; spared", extra={
                    "pool": self.pool, "pods": ",".join(sorted(spared))})
                chosen -= spared
                self._drain(chosen)
        live = self._live()
        if d.replicas >= current:
            target = d.replicas
        elif not down:
            target = current
        else:  # down by the victims only: never a pod that was not chosen, never a busy one
            target = max(d.replicas, len(live) - len(chosen), len(busy & live))
        return target, chosen, spared

    def _by_ordinal(self, pods: list[decision.Pod], d: Decision,
                    current: int) -> tuple[int, set[str]]:
        """A StatefulSet's count and the pods it removes: the highest ordinals drain first
        (no new builds) and the count drops below each only once it is idle."""
        if d.replicas >= current:
            self._drain(set())
            return d.replicas, set()
        draining, count = decision.highest_ordinals(pods, d.replicas)
        self._drain(set(draining))
        target = min(current, count)
        return target, {n for n in draining if (decision.ordinal(n) or 0) >= target}

    def _stale_costs(self) -> set[str]:
        """Pods with a victim's cost that are no victims of this scaler (a former leader's)."""
        return {name for name, p in self._pods().items()
                if p.cost == VICTIM_COST and not p.terminating and name not in self.victims
                and name not in self.leaving}

    def step_down(self) -> None:
        """No longer the leader: victims take builds again here; the count is not ours."""
        for name in sorted(self.victims | set(self.leaving)):
            self.registry.update(name, draining=False, leaving=False)
        self.victims.clear()
        self.leaving.clear()

    def _leave(self, chosen: set[str]) -> None:
        """The count is being lowered with these victims: nothing new goes to them now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEAVING_GRACE
        for name in sorted(chosen):
            self.registry.update(name, leaving=True)
            self.leaving[name] = deadline
        self.victims -= chosen
        if chosen:
            loop.call_at(deadline, self.wake.set)

    def _stay(self, chosen: set[str]) -> None:
        """Lowering the count failed: the victims are only draining again."""
        for name in sorted(chosen):
            self.registry.update(name, leaving=False)
            self.leaving.pop(name, None)
        self.victims |= chosen

    def _expire_leaving(self) -> None:
        """Forgets leaving pods that are gone; takes back those not removed in time."""
        now = asyncio.get_running_loop().time()
        pods = self._pods()
        for name, deadline in list(self.leaving.items()):
            pod = pods.get(name)
            if pod is None:
                del self.leaving[name]
            elif not pod.terminating and now >= deadline:
                del self.leaving[name]
                log.warning("scale-down victim was not removed; taken back",
                            extra={"pool": self.pool, "pod": name})
                self.registry.update(name, leaving=False, draining=False)
                self._uncost.add(name)

    def _drain(self, chosen: set[str]) -> None:
        """Victims take no new builds; former victims that are not needed gone come back."""
        live = self._live()
        for name in sorted(chosen - self.victims):
            self.registry.update(name, draining=True)
        for name in sorted((self.victims - chosen) & live):
            self.registry.update(name, draining=False)
            self._uncost.add(name)
        self.victims = set(chosen)

    async def _set_costs(self, costs: Mapping[str, int | None]) -> None:
        """Sets each pod's deletion cost (None: removes the annotation) where it differs."""
        pods = self._pods()
        for name, cost in sorted(costs.items()):
            pod = pods.get(name)
            if pod is None or pod.cost == cost or pod.terminating:
                continue
            value = None if cost is None else str(cost)
            body: dict[str, Any] = {"metadata": {"annotations": {DELETION_COST: value}}}
            await self._core.patch_namespaced_pod(name, self.namespace, body)

    def document(self, now: float) -> dict[str, Any]:
        last = self.last
        return {
            "deployment": f"{self.namespace}/{self.workload.name}",
            "kind": self.workload.kind,
            "min": self.policy.min_replicas, "max": self.policy.max_replicas,
            "target_builds": self.policy.target_builds,
            "scale_down_window_s": self.policy.down_window,
            "desired": last.wanted if last else None,
            "current": self.current,
            "victims": sorted(self.victims),
            "leaving": sorted(self.leaving),
            "events": [{"ago_s": round(now - t, 3), "direction": d, "from": a, "to": b}
                       for t, d, a, b in self.events[-10:]][::-1],
        }
