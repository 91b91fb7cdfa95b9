"""The scaling decision for one pool (pure: demand, pods and time come in as arguments).

Design, as design.md "Scaling" and the HPA:

- the recommendation is clamp(ceil((running + queued) / target_builds), min, max);
- up at once: a recommendation above the current count is applied as soon as it is made;
- down only after `down_window`: the count applied is the highest recommendation of the last
  window, so demand must stay lower for the whole window before replicas go. `Recommendations`
  keeps just the points that can still be that maximum (values strictly falling with time),
  so it holds at most max_replicas + 1 points;
- never below the replicas that run builds, and never by removing one: `victims` chooses which
  pods go, idle ones only, pods that are not Ready before Ready ones (they serve nothing), then
  the newest (as the ReplicaSet controller would). A StatefulSet's controller removes the
  highest ordinals instead, whatever they run: `highest_ordinals` drains them first and lets
  the count drop only below the busy ones.

The current count is the workload's spec count, which includes pods that are starting: demand
is turned into an absolute count, never added to what is already coming, so a burst that waits
while its pods start does not ask for more pods again.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from gateway.config import ScalingSettings


@dataclass(frozen=True, slots=True)
class Recommendations:
    """(time, replicas) of the last window that can still be its highest, oldest first."""

    points: tuple[tuple[float, int], ...] = ()

    def add(self, now: float, replicas: int, *, window: float) -> Recommendations:
        kept = tuple((t, n) for t, n in self.points if t > now - window and n > replicas)
        return Recommendations((*kept, (now, replicas)))

    def highest(self) -> int:
        return self.points[0][1] if self.points else 0

    def changes_at(self, *, window: float) -> float | None:
        """When the highest recommendation leaves the window (None: it is the newest)."""
        return self.points[0][0] + window if len(self.points) > 1 else None


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    """The count to set."""
    wanted: int
    """This moment's recommendation from demand alone (what the metrics show as desired)."""
    recommendations: Recommendations
    """The state to pass to the next decision."""
    recheck_at: float | None
    """When to decide again even if nothing changes (a lower count may take effect)."""


def wanted(policy: ScalingSettings, *, running: int, queued: int) -> int:
    demand = math.ceil((running + queued) / policy.target_builds)
    return min(policy.max_replicas, max(policy.min_replicas, demand))


def decide(policy: ScalingSettings, recommendations: Recommendations, *, running: int,
           queued: int, busy: int, current: int, now: float) -> Decision:
    """The count for a pool whose spec count is `current` and `busy` replicas run builds.

    The first decision counts `current` as a recommendation made now (as the HPA does), so a
    gateway that starts beside running replicas waits a whole window before removing any.
    """
    if not recommendations.points:
        recommendations = Recommendations(((now, current),))
    want = wanted(policy, running=running, queued=queued)
    recommendations = recommendations.add(now, want, window=policy.down_window)
    if want >= current:
        replicas = want
    else:
        replicas = min(current, recommendations.highest())
    replicas = max(replicas, busy)
    return Decision(replicas, want, recommendations,
                    recommendations.changes_at(window=policy.down_window))


@dataclass(frozen=True, slots=True)
class Pod:
    """What the scaler knows of one pod of the pool."""

    name: str
    ready: bool  # Ready condition true
    terminating: bool  # deletionTimestamp set: already leaving
    created: str  # creationTimestamp (RFC 3339, so it sorts as text)
    busy: bool  # runs a build through this gateway, or a queued build waits for it


def victims(pods: Iterable[Pod], replicas: int, *,
            prefer: Collection[str] = ()) -> tuple[str, ...]:
    """Pods to remove to come down to `replicas`: idle ones only, those in `prefer` (already
    draining) first, then unready ones, then the newest.

    Terminating pods are already leaving and do not count. Fewer victims than asked for when
    not enough pods are idle (the count then stays above `replicas`).
    """
    staying = [p for p in pods if not p.terminating]
    extra = len(staying) - replicas
    if extra <= 0:
        return ()
    idle = sorted((p for p in staying if not p.busy),
                  key=lambda p: (p.name not in prefer, p.ready, _newest_first(p.created),
                                 _newest_first(p.name)))
    return tuple(p.name for p in idle[:extra])


def ordinal(name: str) -> int | None:
    """A StatefulSet pod's ordinal (`<set>-<n>`), or None."""
    _, sep, tail = name.rpartition("-")
    return int(tail) if sep and tail.isdigit() else None


def highest_ordinals(pods: Iterable[Pod], replicas: int) -> tuple[tuple[str, ...], int]:
    """A StatefulSet coming down to `replicas`: its controller removes the highest ordinals,
    whatever they run. So every staying pod at or above `replicas` drains (the first element,
    highest first), and the count may drop only to just above the highest busy one among them
    (the second): an idle tail goes at once, a busy pod holds the count until it is idle."""
    draining = sorted(((n, p) for p in pods if not p.terminating
                       and (n := ordinal(p.name)) is not None and n >= replicas),
                      key=lambda item: item[0], reverse=True)
    count = replicas
    for n, pod in draining:
        if pod.busy:
            count = n + 1
            break
    return tuple(p.name for _, p in draining), count


def _newest_first(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)


VICTIM_COST = -1000
"""controller.kubernetes.io/pod-deletion-cost of a victim: removed before every other pod."""
BUSY_COST = 1000
"""... of a pod running a build: removed after every other pod."""


def deletion_costs(pods: Iterable[Pod], chosen: Iterable[str]) -> Mapping[str, int]:
    """The cost each pod should carry while the pool shrinks: victims low, busy pods high."""
    victim_names = set(chosen)
    costs: dict[str, int] = {}
    for pod in pods:
        if pod.name in victim_names:
            costs[pod.name] = VICTIM_COST
        elif pod.busy and not pod.terminating:
            costs[pod.name] = BUSY_COST
    return costs
