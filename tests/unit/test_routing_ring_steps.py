"""gateway/routing/ring.py's rings made in steps, and the hub making them between loop turns.

Whatever the path (a full build in one go, one made in steps, splices in batches, arcs of any
size), the ring of a node set is the same arrays: every node's points sorted by (point, name).
The hub makes a ring in steps, one per loop turn (turned by hand here), and answers every pick
meanwhile, never with a replica that left.
"""

from __future__ import annotations

import asyncio
import math
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway import config
from gateway.builds.ledger import Ledger
from gateway.metrics import Metrics
from gateway.relay.hub import Hub
from gateway.replicas.registry import Registry, Replica
from gateway.routing import ring as ring_module
from gateway.routing.pick import Outcome
from gateway.routing.ring import HashRing, Steps

UNIVERSE = [f"buildkitd-{i}" for i in range(60)]


def layout(ring: HashRing) -> list[tuple[int, str]]:
    """Every (point, owner) in ring order: what walks are made of."""
    return [(p, ring._names[o]) for p, o in zip(ring._points, ring._owners, strict=True)]


def reference(nodes: set[str], vnodes: int) -> list[tuple[int, str]]:
    """What a ring is, by definition: every point of every node, sorted by (point, name)."""
    return sorted((p, n) for n in nodes for p in ring_module._vnode_points(n, vnodes))


def run(steps: Steps) -> tuple[HashRing, int]:
    """The ring `steps` make, and how many times they yielded."""
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as made:
            return made.value, yields
        yields += 1


def test_a_splice_dearer_than_a_full_build_is_a_full_build() -> None:
    # Every splice batch copies the whole arrays: with thousands of nodes and a tight budget
    # each batch holds one node, and splicing 700 of 3,000 would take 700 steps where a full
    # build takes fewer. The estimate picks the full build; the ring is the same.
    nodes = [f"n{i:04d}" for i in range(3000)]
    whole = HashRing(nodes, vnodes=4)  # every node's points memoized: no hashing below
    before = HashRing(nodes[700:], vnodes=4)
    budget = 30_000
    made, yields = run(before.steps_to(nodes, budget=budget))
    _, full_yields = run(HashRing((), vnodes=4).steps_to(nodes, budget=budget))
    assert layout(made) == layout(whole)
    assert yields == full_yields < 700
    # Without a budget the same change is one splice (one copy of the arrays).
    made, yields = run(before.steps_to(nodes, budget=math.inf))
    assert layout(made) == layout(whole) and yields == 0


def _spread_colliding_points(node: str, vnodes: int) -> bytes:
    """Six points all over the ring, shared by every node (real ones never collide)."""
    rng = random.Random(node)
    return array("Q", sorted(rng.randrange(6) << 61 for _ in range(vnodes))).tobytes()


@settings(max_examples=80, deadline=None)
@given(first=st.sets(st.sampled_from(UNIVERSE)), second=st.sets(st.sampled_from(UNIVERSE)),
       budget=st.sampled_from([0, 30_000, 300_000, math.inf]),
       arc=st.sampled_from([1, 16, 4096]), colliding=st.booleans())
def test_any_path_gives_the_full_build(first: set[str], second: set[str], budget: float,
                                       arc: int, colliding: bool) -> None:
    # budget 0 yields after every unit: each node, each arc, each node spliced
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ring_module, "ARC_POINTS", arc)
        if colliding:
            m.setattr(ring_module, "_vnode_bytes", _spread_colliding_points)
        ring = HashRing(first, vnodes=8)
        assert layout(ring) == reference(first, 8)
        made, _ = run(ring.steps_to(second, budget=budget))
        fresh = HashRing(second, vnodes=8)
        assert made.nodes == fresh.nodes == tuple(sorted(second))
        assert made.members == frozenset(second)
        assert layout(made) == layout(fresh) == reference(second, 8)
        assert layout(ring.with_nodes(second)) == layout(fresh)
        if second == first:
            assert made is ring


def test_a_change_of_many_nodes_is_made_in_many_steps_of_bounded_work() -> None:
    # Counts the points each step reads (nodes' points) and sorts: at most what the budget
    # pays for at the cheapest cost, plus one unit (a node, an arc) and the names sorted once
    nodes = [f"n{i}" for i in range(300)]
    vnodes, budget, arc = 16, 100_000, 256
    read, sorted_ = [0], [0]
    vnode_bytes = ring_module._vnode_bytes

    def counted_bytes(node: str, n: int) -> bytes:
        read[0] += n
        return vnode_bytes(node, n)

    def counted_sorted(items: Any, **kw: Any) -> list[Any]:
        result = sorted(items, **kw)
        sorted_[0] += len(result)
        return result

    HashRing(nodes, vnodes=vnodes)  # memoized: no hashing, which sorts too
    cheapest = min(ring_module.SCAN_NS, ring_module.SORT_NS, ring_module.SPLICE_NS)
    for start, end in (((), nodes), (nodes, nodes[:200]), (nodes[:200], nodes[:220])):
        steps = HashRing(start, vnodes=vnodes).steps_to(end, budget=budget)
        per_step: list[tuple[int, int]] = []
        with pytest.MonkeyPatch.context() as m:
            m.setattr(ring_module, "ARC_POINTS", arc)
            m.setattr(ring_module, "_vnode_bytes", counted_bytes)
            m.setattr(ring_module, "sorted", counted_sorted, raising=False)
            while True:
                read[0] = sorted_[0] = 0
                try:
                    next(steps)
                except StopIteration as done:
                    made = done.value
                    break
                finally:
                    per_step.append((read[0], sorted_[0]))
        assert layout(made) == layout(HashRing(end, vnodes=vnodes))
        assert len(per_step) >= 3
        for points_read, points_sorted in per_step:
            assert points_read <= budget // cheapest + vnodes
            assert points_sorted <= budget // cheapest + 2 * arc + len(nodes) + vnodes


# ---- the hub: rings made between loop turns, picks answered meanwhile -----------------------


class Turns:
    """The hub's loop, turned by hand: what the hub schedules runs at the next turn()."""

    def __init__(self) -> None:
        self._ready: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def time(self) -> float:
        return 0.0  # the loop's clock: stopped

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        self._ready.append((callback, args))

    def turn(self) -> int:
        """Runs what was scheduled before this turn: the number of ring steps among it."""
        ready, self._ready = self._ready, []
        for callback, args in ready:
            callback(*args)
        return sum(getattr(callback, "__name__", "") == "_ring_step" for callback, _ in ready)


REPLICAS = [f"buildkitd-{i:03d}" for i in range(200)]
KEYS = [f"ctx:/src/p{i}" for i in range(40)]


def replicas(ready: Callable[[str], bool]) -> list[Replica]:
    return [Replica(r, "tcp://127.0.0.1:9", ready=ready(r), reason="") for r in REPLICAS]


def make_hub(registry: Registry) -> tuple[Hub, Turns]:
    """A hub over one sticky pool without cache affinity, its loop turned by hand; needs a
    running event loop."""
    settings = config.load(["--replica", "tcp://127.0.0.1:9", "--affinity-keys", "0"], {})
    pool = replace(settings.pools[0], loadbalance="sticky", max_builds=0)
    hub = Hub(relay=settings.relay, routing=settings.routing, pools=(pool,), registry=registry,
              ledger=Ledger(), control=config.Endpoint("unix", path="/nonexistent"),
              spawn=lambda coro, name: coro.close(),
              metrics=Metrics(CollectorRegistry(), version="test"),
              eject=lambda replica, reason: None, rng=random.Random(0))
    turns = Turns()
    hub.loop = turns  # type: ignore[assignment]
    return hub, turns


def pick(hub: Hub, key: str) -> tuple[str, Outcome]:
    got = hub.pick("default", key, internal=False, ref="", queued=True)
    assert isinstance(got, tuple)
    return got


def turn_until_made(hub: Hub, turns: Turns, check: Callable[[], None]) -> int:
    """Turns the loop until the pool's ring is made, checking picks before each turn; every
    turn runs one ring step. The number of turns."""
    state = hub.pools["default"]
    count = 0
    while state.ring_steps is not None:
        check()
        assert turns.turn() == 1
        count += 1
        assert count < 1000
    return count


def test_the_hub_makes_rings_in_steps_and_answers_picks_meanwhile() -> None:
    async def scenario() -> None:
        registry = Registry(replicas(lambda r: False))
        hub, turns = make_hub(registry)
        state = hub.pools["default"]

        def every_pick_a_member(outcomes: set[Outcome]) -> Callable[[], None]:
            def check() -> None:
                for key in KEYS:
                    replica, outcome = pick(hub, key)
                    assert replica in state.members and outcome in outcomes
            return check

        # 200 replicas turn ready: the first ring, a full build in steps; two choices meanwhile
        registry.replace_all(replicas(lambda r: True))
        assert state.ring_steps is not None
        assert turn_until_made(hub, turns, every_pick_a_member({Outcome.RANDOM})) >= 2
        assert layout(state.ring) == layout(HashRing(REPLICAS))
        full = HashRing(REPLICAS)
        assert all(pick(hub, k) == (full.lookup(k), Outcome.PRIMARY) for k in KEYS)

        # 120 leave (a full build): the last ring without them already answers as the new one
        staying = set(REPLICAS[::5]) | set(REPLICAS[1::5])
        fewer = HashRing(staying)

        def as_the_new_ring() -> None:
            assert all(pick(hub, k) == (fewer.lookup(k), Outcome.PRIMARY) for k in KEYS)

        registry.replace_all(replicas(staying.__contains__))
        assert state.ring_steps is not None
        assert turn_until_made(hub, turns, as_the_new_ring) >= 1
        assert layout(state.ring) == layout(fewer)

        # they come back, and one more leaves while that ring is made: the picks are the last
        # ring's until then, the next ring is made from that one
        registry.replace_all(replicas(lambda r: True))
        assert turns.turn() == 1
        assert all(pick(hub, k) == (fewer.lookup(k), Outcome.PRIMARY) for k in KEYS)
        registry.update(REPLICAS[0], ready=False)
        turn_until_made(hub, turns, every_pick_a_member({Outcome.PRIMARY, Outcome.SPILL,
                                                         Outcome.RANDOM}))
        assert layout(state.ring) == layout(HashRing(REPLICAS[1:]))

        # one replica changing is made at once, at the change
        registry.update(REPLICAS[0], ready=True)
        assert state.ring_steps is None
        assert layout(state.ring) == layout(full)
        assert turns.turn() == 0

    asyncio.run(scenario())


def test_a_failing_ring_step_is_logged_and_picks_go_on_with_members_only(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        registry = Registry(replicas(lambda r: False))
        hub, turns = make_hub(registry)
        state = hub.pools["default"]
        registry.replace_all(replicas(lambda r: True))
        turn_until_made(hub, turns, lambda: None)
        broken = state.ring

        def fail(self: HashRing, nodes: object, **kw: object) -> Iterator[None]:
            raise MemoryError("no room for the ring")
            yield  # a generator, as steps_to

        monkeypatch.setattr(HashRing, "steps_to", fail)
        with caplog.at_level("ERROR", logger="gateway.relay"):
            registry.update(REPLICAS[0], ready=False)  # the step raises in the listener
        assert "ring step failed" in caplog.text
        assert state.ring is broken and state.ring_steps is None
        for key in KEYS:  # the stale ring, without the replica that left
            replica, _ = pick(hub, key)
            assert replica != REPLICAS[0] and replica in state.members

    asyncio.run(scenario())
