"""Picking a replica at scale: pick time, ring rebuilds, Zipf balance, keys moved.

Drives the hub's real `pick` (gateway/relay/hub.py) over a registry of N ready replicas and a
ledger holding running builds; nothing is sent anywhere. Prints, in one run:

- pick: microseconds per Hub.pick at 10/100/1,000 replicas, sticky (bounded loads) and random
  (two choices), with --max-builds 16 and running builds placed through the hub itself with
  Zipf keys beforehand (96 at 10 replicas, 300 at 100 and 1,000), so loads, full replicas and
  spills are realistic. The state does not change while picks are timed.
- ring: HashRing at 1,000 replicas (160,000 points): a full build with every node's points
  hashed (cold) and memoized (warm), one node added (its points not memoized yet) or removed
  (`with_nodes`), and the hub's first pick after one replica turns unready, then ready again
  (registry change: ring update and pick).
- zipf: builds ending and starting in a steady state (each step ends a random running build and
  places one) with Zipf(s=1.1) keys over 50 keys per replica, sticky with the default
  --load-factor and no slot limit. After each placement: peak load / average load. The bound
  is ceil(c x average) / average, which is c when c x average is a whole number, as in the
  runs shown.
- moved: keys whose replica changes when one node joins N, against the ideal 1/(N+1), and
  whether every moved key went to the new node.

Stops by itself: every timed loop ends after its share of --budget seconds.

    .venv/bin/python bench/picks.py [--budget 1.0] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from gateway import config
from gateway.builds.ledger import Ledger
from gateway.metrics import Metrics
from gateway.relay.hub import Hub
from gateway.replicas.registry import Registry, Replica
from gateway.routing import ring as ring_module
from gateway.routing.ring import HashRing

POOL = "default"
MAX_BUILDS = 16
ZIPF_S = 1.1


def replica_ids(n: int) -> list[str]:
    return [f"buildkitd-{i:04d}.buildkitd.builders.svc:1234" for i in range(n)]


def make_hub(n: int, *, policy: str, max_builds: int, seed: int) -> Hub:
    """A hub over `n` ready replicas of one pool; needs a running event loop."""
    settings = config.load(["--replica", "tcp://127.0.0.1:9"], {})
    pool = replace(settings.pools[0], loadbalance=policy, max_builds=max_builds)
    registry = Registry(Replica(r, "tcp://127.0.0.1:9", ready=True, reason="")
                        for r in replica_ids(n))
    return Hub(relay=settings.relay, routing=settings.routing, pools=(pool,),
               registry=registry, ledger=Ledger(),
               control=config.Endpoint("unix", path="/nonexistent"),
               spawn=lambda coro, name: coro.close(),
               metrics=Metrics(CollectorRegistry(), version="bench"),
               eject=lambda replica, reason: None, rng=random.Random(seed))


class Zipf:
    """Keys "ctx:/src/project-<rank>", rank drawn with probability proportional to rank^-s."""

    def __init__(self, keys: int, rng: random.Random, *, s: float = ZIPF_S) -> None:
        self._cum = list(itertools.accumulate(1 / k**s for k in range(1, keys + 1)))
        self._rng = rng

    def key(self) -> str:
        rank = bisect.bisect(self._cum, self._rng.random() * self._cum[-1])
        return f"ctx:/src/project-{rank + 1}"


def place(hub: Hub, key: str, ref: str) -> bool:
    """Places one build through the hub, as admission does; False when it would wait."""
    chosen = hub.pick(POOL, key, internal=False, ref=ref, queued=True)
    if not isinstance(chosen, tuple):
        return False
    hub.ledger.start(ref, chosen[0], internal=False, now=0.0)
    return True


def per_call_us(fn: Callable[[], object], *, seconds: float, rounds: int = 5) -> float:
    """Median over `rounds` of the mean time of one call, each round taking ~seconds/rounds."""
    results = []
    for _ in range(rounds):
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds / rounds
        while True:
            fn()
            calls += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        results.append((now - start) / calls * 1e6)
    return statistics.median(results)


def time_picks(hub: Hub, keys: list[str], *, seconds: float) -> float:
    """us per pick of a new build (a Ref running nowhere) with `keys` in turn; places none."""
    cycle = itertools.cycle(keys)
    return per_call_us(lambda: hub.pick(POOL, next(cycle), internal=False, ref="new",
                                         queued=True), seconds=seconds)


def bench_picks(budget: float, seed: int) -> None:
    print(f"pick: us per Hub.pick, --max-builds {MAX_BUILDS}, running builds placed with "
          f"Zipf(s={ZIPF_S}) keys")
    for n in (10, 100, 1000):
        builds = min(300, n * MAX_BUILDS * 6 // 10)
        for policy in ("sticky", "random"):
            rng = random.Random(seed)
            hub = make_hub(n, policy=policy, max_builds=MAX_BUILDS, seed=seed)
            zipf = Zipf(50 * n, rng)
            for i in range(builds):
                place(hub, zipf.key(), f"run-{i}")
            us = time_picks(hub, [zipf.key() for _ in range(1000)], seconds=budget / 6)
            loads = hub.ledger.loads()
            print(f"  {n:>5} replicas  {policy:<6}  {us:8.2f} us   ({sum(loads.values())} "
                  f"running, peak {max(loads.values())} on one replica)")


def bench_ring(budget: float, seed: int) -> None:
    nodes = replica_ids(1000)
    print("ring: 1,000 replicas x 160 points")
    cold = []
    for _ in range(3):
        ring_module._vnode_bytes.cache_clear()
        start = time.perf_counter()
        HashRing(nodes)
        cold.append((time.perf_counter() - start) * 1e3)
    print(f"  full build, points hashed (cold)     {statistics.median(cold):8.2f} ms")
    warm = per_call_us(lambda: HashRing(nodes), seconds=budget / 4, rounds=3) / 1e3
    print(f"  full build, points memoized (warm)   {warm:8.2f} ms")
    ring = HashRing(nodes)
    fresh = (f"buildkitd-new-{i}" for i in itertools.count())
    added = per_call_us(lambda: ring.with_nodes([*nodes, next(fresh)]), seconds=budget / 8)
    print(f"  one node added (with_nodes)          {added / 1e3:8.2f} ms")
    removed = per_call_us(lambda: ring.with_nodes(nodes[1:]), seconds=budget / 8)
    print(f"  one node removed (with_nodes)        {removed / 1e3:8.2f} ms")
    bench_registry_change(nodes, budget, seed)


def bench_registry_change(nodes: list[str], budget: float, seed: int) -> None:
    hub = make_hub(len(nodes), policy="sticky", max_builds=MAX_BUILDS, seed=seed)
    hub.pick(POOL, "ctx:/warm", internal=False, ref="r", queued=True)  # the first ring
    flips = itertools.cycle(nodes)
    times = []
    deadline = time.perf_counter() + budget / 4
    while time.perf_counter() < deadline or not times:
        replica = next(flips)
        for ready in (False, True):
            hub.registry.update(replica, ready=ready)
            start = time.perf_counter()
            hub.pick(POOL, "ctx:/src/app", internal=False, ref="r", queued=True)
            times.append((time.perf_counter() - start) * 1e3)
    print(f"  hub: first pick after a replica turns unready or ready "
          f"{statistics.median(times):8.2f} ms  (median of {len(times)})")


def bench_zipf(budget: float, seed: int) -> None:
    c = config.load(["--replica", "tcp://127.0.0.1:9"], {}).pools[0].load_factor
    print(f"zipf: steady state, Zipf(s={ZIPF_S}) keys, sticky, c={c:g}, no slot limit")
    for n, average in ((10, 16), (100, 8), (1000, 4)):
        rng = random.Random(seed)
        hub = make_hub(n, policy="sticky", max_builds=0, seed=seed)
        zipf = Zipf(50 * n, rng)
        running = [f"run-{i}" for i in range(n * average)]
        for ref in running:
            place(hub, zipf.key(), ref)
        ratios = []
        steps = itertools.count(len(running))
        deadline = time.perf_counter() + budget / 3
        while time.perf_counter() < deadline and len(ratios) < 20_000:
            i = rng.randrange(len(running))
            ref = running[i]
            hub.ledger.finish(ref, next(iter(hub.ledger.running_on(ref))), result="ok", now=0)
            running[i] = f"run-{next(steps)}"
            place(hub, zipf.key(), running[i])
            loads = hub.ledger.loads()
            ratios.append(max(loads.values()) / (sum(loads.values()) / n))
        bound = math.ceil(c * average) / average
        print(f"  {n:>5} replicas, average {average:>2}: peak/average max {max(ratios):.3f}, "
              f"mean {statistics.fmean(ratios):.3f} over {len(ratios)} placements "
              f"(bound {bound:.3f})")


def bench_moved(seed: int) -> None:
    keys = [f"ctx:/src/repo-{seed}-{i}" for i in range(20_000)]
    print(f"moved: keys changing replica when a node joins N ({len(keys)} keys)")
    for n in (2, 4, 8, 16):
        nodes = replica_ids(n + 1)
        before, after = HashRing(nodes[:n]), HashRing(nodes)
        moved = [k for k in keys if before.lookup(k) != after.lookup(k)]
        to_new = all(after.lookup(k) == nodes[n] for k in moved)
        print(f"  N={n:>2}: moved {len(moved) / len(keys):.4f}, ideal 1/(N+1) = "
              f"{1 / (n + 1):.4f}, all to the new node: {to_new}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=1.0,
                    help="seconds for each timed section (pick, ring, zipf)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    bench_picks(args.budget, args.seed)
    bench_ring(args.budget, args.seed)
    bench_zipf(args.budget, args.seed)
    bench_moved(args.seed)


if __name__ == "__main__":
    asyncio.run(main())
