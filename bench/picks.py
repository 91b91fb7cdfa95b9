"""Picking a replica at scale: pick time, ring rebuilds, Zipf balance, keys moved.

Drives the hub's real `pick` (gateway/relay/hub.py) over a registry of N ready replicas and a
ledger holding running builds; nothing is sent anywhere. Prints, in one run:

- pick: microseconds per Hub.pick at 10/100/1,000 replicas, sticky (bounded loads) and random
  (two choices), with --max-builds 16 and running builds placed through the hub itself with
  Zipf keys beforehand (96 at 10 replicas, 300 at 100 and 1,000), so loads, full replicas and
  spills are realistic. The state does not change while picks are timed.
- ring: HashRing at 1,000 replicas (160,000 points): a full build in one go with every node's
  points hashed (cold) and memoized (warm), one node added (its points not memoized yet) or
  removed (`with_nodes`), and one replica turning unready, then ready again, with the hub's
  first pick after it (registry change, ring update, pick). Then the hub making its ring in
  steps (HashRing.steps_to, one per loop turn) at 1,000 replicas, the event loop running: the
  longest time the loop is blocked in one go (the registry change with the first step, or a
  loop turn: a heartbeat task times its turns), the turns and the time until the ring is made,
  for the first ring (1,000 replicas turn ready, cold and warm), 300 leaving and coming back
  (more than a quarter: full builds) and 100 leaving (splices in batches); 3 runs each.
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
import functools
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


def replicas(ids: list[str], ready: Callable[[str], bool]) -> list[Replica]:
    return [Replica(r, "tcp://127.0.0.1:9", ready=ready(r), reason="") for r in ids]


def new_hub(registry: Registry, *, policy: str, max_builds: int, seed: int) -> Hub:
    """A hub over `registry`'s replicas, all of one pool; needs a running event loop."""
    settings = config.load(["--replica", "tcp://127.0.0.1:9"], {})
    pool = replace(settings.pools[0], loadbalance=policy, max_builds=max_builds)
    return Hub(relay=settings.relay, routing=settings.routing, pools=(pool,),
               registry=registry, ledger=Ledger(),
               control=config.Endpoint("unix", path="/nonexistent"),
               spawn=lambda coro, name: coro.close(),
               metrics=Metrics(CollectorRegistry(), version="bench"),
               eject=lambda replica, reason: None, rng=random.Random(seed))


async def ring_made(hub: Hub) -> int:
    """Lets the loop turn until the hub has made its ring (one step per turn): the turns."""
    turns = 0
    while hub.pools[POOL].ring_steps is not None:
        await asyncio.sleep(0)
        turns += 1
    return turns


async def make_hub(n: int, *, policy: str, max_builds: int, seed: int) -> Hub:
    """A hub over `n` ready replicas of one pool, its ring made; needs a running event loop."""
    hub = new_hub(Registry(replicas(replica_ids(n), lambda r: True)), policy=policy,
                  max_builds=max_builds, seed=seed)
    await ring_made(hub)
    return hub


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


async def bench_picks(budget: float, seed: int) -> None:
    print(f"pick: us per Hub.pick, --max-builds {MAX_BUILDS}, running builds placed with "
          f"Zipf(s={ZIPF_S}) keys")
    for n in (10, 100, 1000):
        builds = min(300, n * MAX_BUILDS * 6 // 10)
        for policy in ("sticky", "random"):
            rng = random.Random(seed)
            hub = await make_hub(n, policy=policy, max_builds=MAX_BUILDS, seed=seed)
            zipf = Zipf(50 * n, rng)
            for i in range(builds):
                place(hub, zipf.key(), f"run-{i}")
            us = time_picks(hub, [zipf.key() for _ in range(1000)], seconds=budget / 6)
            loads = hub.ledger.loads()
            print(f"  {n:>5} replicas  {policy:<6}  {us:8.2f} us   ({sum(loads.values())} "
                  f"running, peak {max(loads.values())} on one replica)")


async def bench_ring(budget: float, seed: int) -> None:
    nodes = replica_ids(1000)
    print("ring: 1,000 replicas x 160 points")
    cold = []
    for _ in range(3):
        ring_module._memo.clear()
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
    await bench_registry_change(nodes, budget, seed)
    await bench_ring_steps(nodes, seed)


async def bench_registry_change(nodes: list[str], budget: float, seed: int) -> None:
    hub = await make_hub(len(nodes), policy="sticky", max_builds=MAX_BUILDS, seed=seed)
    flips = itertools.cycle(nodes)
    times = []
    deadline = time.perf_counter() + budget / 4
    while time.perf_counter() < deadline or not times:
        replica = next(flips)
        for ready in (False, True):
            start = time.perf_counter()
            hub.registry.update(replica, ready=ready)
            hub.pick(POOL, "ctx:/src/app", internal=False, ref="r", queued=True)
            times.append((time.perf_counter() - start) * 1e3)
    print(f"  hub: a replica turns unready or ready, and the first pick "
          f"{statistics.median(times):6.2f} ms  (median of {len(times)})")


async def blocked(hub: Hub, change: Callable[[], None]) -> tuple[float, int, float]:
    """Makes the registry `change` and lets the loop turn until the hub has made its ring,
    picking once per turn: the longest the loop was blocked in one go (the change with the
    ring's first step, or a turn as a heartbeat task sees it), the turns, the time to the
    ring, in ms."""
    start = time.perf_counter()
    change()
    longest = time.perf_counter() - start
    turns = 0
    while hub.pools[POOL].ring_steps is not None:
        assert isinstance(hub.pick(POOL, f"ctx:/src/p{turns}", internal=False, ref="r",
                                   queued=True), tuple)  # answered meanwhile
        before = time.perf_counter()
        await asyncio.sleep(0)
        longest = max(longest, time.perf_counter() - before)
        turns += 1
    return longest * 1e3, turns, (time.perf_counter() - start) * 1e3


async def bench_ring_steps(nodes: list[str], seed: int, *, runs: int = 3) -> None:
    print("  hub making its ring in steps, loop running: longest block (worst run), turns, "
          f"time to the ring; median of {runs} runs")
    leaving = set(nodes[::10])
    many = set(nodes[::10]) | set(nodes[1::10]) | set(nodes[2::10])
    scenarios: list[tuple[str, bool, Callable[[str], bool], Callable[[str], bool]]] = [
        ("first ring, points hashed (cold)", True, lambda r: False, lambda r: True),
        ("first ring, points memoized (warm)", False, lambda r: False, lambda r: True),
        ("300 of 1,000 leave (full build)", False, lambda r: True, lambda r: r not in many),
        ("300 come back to 700 (full build)", False, lambda r: r not in many, lambda r: True),
        ("100 of 1,000 leave (splices)", False, lambda r: True, lambda r: r not in leaving),
    ]
    for label, cold, before, after in scenarios:
        results = []
        for _ in range(runs):
            hub = new_hub(Registry(replicas(nodes, before)), policy="sticky",
                          max_builds=MAX_BUILDS, seed=seed)
            await ring_made(hub)
            if cold:
                ring_module._memo.clear()
            change = functools.partial(hub.registry.replace_all, replicas(nodes, after))
            results.append(await blocked(hub, change))
        longest, turns, total = (statistics.median(r[i] for r in results) for i in range(3))
        worst = max(r[0] for r in results)
        print(f"    {label:<36} {longest:6.2f} ms ({worst:5.2f})  {turns:4.0f} turns  "
              f"{total:7.2f} ms")


async def bench_zipf(budget: float, seed: int) -> None:
    c = config.load(["--replica", "tcp://127.0.0.1:9"], {}).pools[0].load_factor
    print(f"zipf: steady state, Zipf(s={ZIPF_S}) keys, sticky, c={c:g}, no slot limit")
    for n, average in ((10, 16), (100, 8), (1000, 4)):
        rng = random.Random(seed)
        hub = await make_hub(n, policy="sticky", max_builds=0, seed=seed)
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
    await bench_picks(args.budget, args.seed)
    await bench_ring(args.budget, args.seed)
    await bench_zipf(args.budget, args.seed)
    bench_moved(args.seed)


if __name__ == "__main__":
    asyncio.run(main())
