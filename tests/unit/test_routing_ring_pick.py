"""gateway/routing/ring.py and pick.py: consistent hashing, bounded loads, two choices.

The fast paths are checked against the straightforward algorithms they replaced, kept here as
references: the ring that walked every point (OldHashRing), and the hub's pick that filtered the
full walk and summed loads over every candidate (reference_pick).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import math
import random
from array import array
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway import config
from gateway.builds.ledger import Ledger
from gateway.metrics import Metrics
from gateway.relay.hub import Hub
from gateway.replicas.registry import Registry, Replica
from gateway.routing import key
from gateway.routing import ring as ring_module
from gateway.routing.pick import Outcome, bounded, is_open, load_cap, open_share, two_choices
from gateway.routing.placement import WAIT, Pick
from gateway.routing.ring import HashRing

NODES = ["10.0.0.1:1234", "10.0.0.2:1234", "10.0.0.3:1234"]


# ---- the references: the algorithms before O(log n) picking ----------------------------------


def _old_point(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class OldHashRing:
    """The ring as it was: sorted (point, node) pairs, a walk over every point."""

    def __init__(self, nodes: Iterable[str], *, vnodes: int = 160) -> None:
        self._nodes = tuple(sorted(set(nodes)))
        pairs = sorted((_old_point(f"{n}#{i}"), n) for n in self._nodes for i in range(vnodes))
        self._points = [p for p, _ in pairs]
        self._owners = [n for _, n in pairs]

    def walk(self, key: str) -> list[str]:
        if not self._nodes:
            return []
        start = bisect.bisect(self._points, _old_point(key))
        seen: dict[str, None] = {}
        count = len(self._owners)
        for i in range(count):
            node = self._owners[(start + i) % count]
            if node not in seen:
                seen[node] = None
                if len(seen) == len(self._nodes):
                    break
        return list(seen)


def old_bounded(order: list[str], loads: dict[str, int], *,
                c: float) -> tuple[str, Outcome] | None:
    """bounded() as it was: the cap from the loads of every candidate."""
    if not order:
        return None
    total = sum(loads.get(n, 0) for n in order) + 1
    cap = math.ceil(c * total / len(order))
    for i, node in enumerate(order):
        if loads.get(node, 0) < cap:
            return node, Outcome.PRIMARY if i == 0 else Outcome.SPILL
    return order[0], Outcome.PRIMARY


def reference_pick(hub: Hub, key: str | None, *, internal: bool,
                   ref: str) -> tuple[list[str], tuple[str, Outcome] | None]:
    """Hub.pick as it was (a pool with nothing queued, no tenant limit, no target): the free
    replicas, and the answer when it is sticky (deterministic), else None."""
    state = hub.pools["default"]
    candidates = hub.registry.snapshot.placeable("default")
    exclude = hub.ledger.running_on(ref) if ref else frozenset()
    loads = hub.ledger.loads()
    limit = state.settings.max_builds
    free = [c for c in candidates
            if c not in exclude and (internal or not limit or loads.get(c, 0) < limit)]
    if not free or internal or key is None or state.settings.loadbalance == "random":
        return free, None
    order = [r for r in OldHashRing(candidates).walk(key) if r in free]
    return free, old_bounded(order, loads, c=state.settings.load_factor)


def ctx_key(directory: str, node_id: str) -> str | None:
    return key.placement_key(sharedkey=f"{directory}:{node_id}", authority="gw:1234",
                             client="10.1.1.1")


@settings(max_examples=100, deadline=None)
@given(directory=st.text(min_size=1, max_size=40).filter(lambda s: s.strip()),
       node_ids=st.lists(st.binary(min_size=8, max_size=8).map(bytes.hex), min_size=2,
                         max_size=5))
def test_same_directory_from_different_node_ids_maps_to_one_node(
    directory: str, node_ids: list[str]
) -> None:
    ring = HashRing(NODES)
    keys = {ctx_key(directory, n) for n in node_ids}
    assert len(keys) == 1
    (k,) = keys
    assert k is not None
    assert k == "ctx:" + directory
    assert len({ring.lookup(ctx_key(directory, n) or "") for n in node_ids}) == 1


def test_src_app_with_random_node_ids() -> None:
    rng = random.Random(7)
    ring = HashRing(NODES)
    owners = {ring.lookup(ctx_key("/src/app", rng.randbytes(8).hex()) or "") for _ in range(50)}
    assert len(owners) == 1


def test_thirty_directories_spread_over_all_three_nodes() -> None:
    ring = HashRing(NODES)
    rng = random.Random(3)
    owners = Counter(
        ring.lookup(ctx_key(f"/home/ci/builds/project-{i}", rng.randbytes(8).hex()) or "")
        for i in range(30)
    )
    assert set(owners) == set(NODES)
    assert min(owners.values()) >= 3  # not just touching a node: a real spread


def test_adding_a_fourth_node_moves_few_keys_and_only_to_it() -> None:
    three = HashRing(NODES)
    four = HashRing([*NODES, "10.0.0.4:1234"])
    keys = [f"ctx:/src/repo-{i}" for i in range(1000)]
    moved = [(three.lookup(k), four.lookup(k)) for k in keys if three.lookup(k) != four.lookup(k)]
    assert 0 < len(moved) <= 300
    assert all(new == "10.0.0.4:1234" for _, new in moved)


def test_removing_a_node_moves_only_its_keys() -> None:
    three = HashRing(NODES)
    two = HashRing(NODES[:2])
    for i in range(500):
        k = f"host:h{i}"
        if three.lookup(k) != NODES[2]:
            assert two.lookup(k) == three.lookup(k)


def test_ring_is_a_function_of_the_node_set() -> None:
    a = HashRing(NODES)
    b = HashRing([*reversed(NODES), NODES[0]])
    assert a.nodes == b.nodes == tuple(sorted(NODES))
    for i in range(200):
        assert list(a.walk(f"k{i}")) == list(b.walk(f"k{i}"))


@settings(max_examples=100, deadline=None)
@given(k=st.text(max_size=30), n=st.integers(1, 8))
def test_walk_yields_every_node_once_starting_at_lookup(k: str, n: int) -> None:
    nodes = [f"n{i}" for i in range(n)]
    ring = HashRing(nodes, vnodes=20)
    order = list(ring.walk(k))
    assert sorted(order) == sorted(nodes)
    assert order[0] == ring.lookup(k)


def test_empty_ring() -> None:
    ring = HashRing([])
    assert list(ring.walk("x")) == []
    assert ring.lookup("x") is None


# ---- bounded loads ---------------------------------------------------------------------------


def bounded_c(order: list[str], loads: dict[str, int], *, c: float,
              exclude: Collection[str] = (), limit: int = 0) -> tuple[str, Outcome] | None:
    """bounded() with its cap computed the straightforward way, over the open nodes."""
    open_nodes = [n for n in order if is_open(n, loads, exclude=exclude, limit=limit)]
    if not open_nodes:
        return None
    cap = load_cap(load=sum(loads.get(n, 0) for n in open_nodes), count=len(open_nodes), c=c)
    return bounded(iter(order), loads, cap=cap, exclude=exclude, limit=limit)


@pytest.mark.parametrize("builds", [1, 2, 7, 30, 100])
def test_hot_key_respects_the_bound(builds: int) -> None:
    ring = HashRing(NODES)
    order = list(ring.walk("ctx:/src/hot"))
    loads: dict[str, int] = {}
    outcomes = []
    for _ in range(builds):
        picked = bounded_c(order, loads, c=1.25)
        assert picked is not None
        node, outcome = picked
        outcomes.append(outcome)
        loads[node] = loads.get(node, 0) + 1
        total = sum(loads.values())
        assert max(loads.values()) <= math.ceil(1.25 * total / len(NODES))
    assert outcomes[0] is Outcome.PRIMARY
    assert loads[order[0]] == max(loads.values())
    if builds >= 7:
        assert Outcome.SPILL in outcomes
        assert len(loads) == 3


def test_bounded_prefers_the_primary_when_below_the_bound() -> None:
    order = ["a", "b", "c"]
    assert bounded_c(order, {}, c=1.25) == ("a", Outcome.PRIMARY)
    assert bounded_c(order, {"a": 1, "b": 1, "c": 1}, c=1.25) == ("a", Outcome.PRIMARY)
    # average incl. the new build = 7/3, cap = ceil(2.92) = 3: a (3) is full
    assert bounded_c(order, {"a": 3, "b": 2, "c": 1}, c=1.25) == ("b", Outcome.SPILL)
    assert bounded_c(order, {"a": 3, "b": 3, "c": 0}, c=1.25) == ("c", Outcome.SPILL)


@settings(max_examples=200, deadline=None)
@given(loads=st.lists(st.integers(0, 50), min_size=1, max_size=6),
       c=st.floats(1.0, 3.0), excluded=st.sets(st.integers(0, 5), max_size=6))
def test_bounded_never_exceeds_cap(loads: list[int], c: float, excluded: set[int]) -> None:
    order = [f"n{i}" for i in range(len(loads))]
    load_map = dict(zip(order, loads, strict=True))
    exclude = {f"n{i}" for i in excluded}
    picked = bounded_c(order, load_map, c=c, exclude=exclude)
    candidates = [n for n in order if n not in exclude]
    if not candidates:
        assert picked is None
        return
    assert picked is not None
    node, outcome = picked
    assert node in candidates
    total = sum(load_map[n] for n in candidates) + 1
    assert load_map[node] < math.ceil(c * total / len(candidates))
    # the first candidate in ring order under the cap
    cap = math.ceil(c * total / len(candidates))
    assert node == next(n for n in candidates if load_map[n] < cap)
    assert outcome is (Outcome.PRIMARY if node == candidates[0] else Outcome.SPILL)


def test_bounded_exclusion() -> None:
    order = ["a", "b", "c"]
    assert bounded_c(order, {}, c=1.25, exclude={"a"}) == ("b", Outcome.PRIMARY)
    assert bounded_c(order, {}, c=1.25, exclude={"a", "b"}) == ("c", Outcome.PRIMARY)
    assert bounded_c(order, {}, c=1.25, exclude=set(order)) is None
    assert bounded_c([], {}, c=1.25) is None


# ---- two choices -----------------------------------------------------------------------------


def test_two_choices_spreads_evenly_with_reset_loads() -> None:
    rng = random.Random(12345)
    counts = Counter(two_choices(NODES, {}, rng) for _ in range(3000))
    assert set(counts) == set(NODES)
    for n in NODES:
        assert 800 <= counts[n] <= 1200


def test_two_choices_takes_the_less_loaded() -> None:
    rng = random.Random(1)
    loads = {"a": 5, "b": 0}
    assert all(two_choices(["a", "b"], loads, rng) == "b" for _ in range(50))
    # with three candidates the most loaded one is never chosen
    loads3 = {"a": 9, "b": 1, "c": 2}
    assert "a" not in {two_choices(["a", "b", "c"], loads3, rng) for _ in range(200)}


def test_two_choices_balances_under_accumulating_load() -> None:
    rng = random.Random(99)
    loads: dict[str, int] = {}
    for _ in range(300):
        n = two_choices(NODES, loads, rng)
        assert n is not None
        loads[n] = loads.get(n, 0) + 1
    assert max(loads.values()) - min(loads.values()) <= 2


def test_two_choices_exclusion() -> None:
    rng = random.Random(5)
    assert {two_choices(NODES, {}, rng, exclude={NODES[0]}) for _ in range(100)} == set(NODES[1:])
    assert two_choices(NODES, {}, rng, exclude=set(NODES[1:])) == NODES[0]
    assert two_choices(NODES, {}, rng, exclude=set(NODES)) is None
    assert two_choices([], {}, rng) is None


# ---- ring: same layout as before, splices equal to full builds -------------------------------


@settings(max_examples=60, deadline=None)
@given(nodes=st.sets(st.text(max_size=12), max_size=8),
       keys=st.lists(st.text(max_size=20), min_size=1, max_size=10))
def test_walks_are_the_old_rings(nodes: set[str], keys: list[str]) -> None:
    # the point layout is unchanged: keys land where they did before the rewrite
    new, old = HashRing(nodes), OldHashRing(nodes)
    for k in keys:
        assert list(new.walk(k)) == old.walk(k)


def layout(ring: HashRing) -> list[tuple[int, str]]:
    """Every (point, owner) in ring order: what walks are made of."""
    return [(p, ring._names[o]) for p, o in zip(ring._points, ring._owners, strict=True)]


UNIVERSE = [f"buildkitd-{i}" for i in range(40)]


@settings(max_examples=80, deadline=None)
@given(first=st.sets(st.sampled_from(UNIVERSE), max_size=40),
       changes=st.lists(st.sets(st.sampled_from(UNIVERSE), min_size=1, max_size=5),
                        min_size=1, max_size=6))
def test_with_nodes_equals_a_full_build(first: set[str], changes: list[set[str]]) -> None:
    # each change toggles a few nodes (in or out), as readiness flips do: mostly splices
    ring, nodes = HashRing(first, vnodes=12), set(first)
    for toggled in changes:
        nodes ^= toggled
        ring = ring.with_nodes(nodes)
        fresh = HashRing(nodes, vnodes=12)
        assert ring.nodes == fresh.nodes == tuple(sorted(nodes))
        assert layout(ring) == layout(fresh)
        assert all(list(ring.walk(k)) == list(fresh.walk(k)) for k in ("a", "b", "ctx:/x"))


def test_with_nodes_keeps_the_ring_for_the_same_set() -> None:
    ring = HashRing(NODES)
    assert ring.with_nodes(reversed(NODES)) is ring  # a registry version changing nothing


def _colliding_points(node: str, vnodes: int) -> bytes:
    """Points in [0, 6): every node's points collide with others' (real ones never do)."""
    rng = random.Random(node)
    return array("Q", sorted(rng.randrange(6) for _ in range(vnodes))).tobytes()


@settings(max_examples=60, deadline=None)
@given(first=st.sets(st.sampled_from(UNIVERSE[:12]), min_size=8, max_size=12),
       toggled=st.sets(st.sampled_from(UNIVERSE[:12]), min_size=1, max_size=2))
def test_equal_points_are_in_name_order_after_a_splice(first: set[str],
                                                       toggled: set[str]) -> None:
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ring_module, "_vnode_bytes", _colliding_points)
        spliced = HashRing(first, vnodes=4).with_nodes(first ^ toggled)
        fresh = HashRing(first ^ toggled, vnodes=4)
        assert layout(spliced) == layout(fresh) == sorted(layout(fresh))


def test_walk_is_lazy() -> None:
    ring = HashRing([f"n{i}" for i in range(100)], vnodes=8)
    walk = ring.walk("ctx:/src/app")
    first = next(walk)
    assert first == ring.lookup("ctx:/src/app")
    assert first not in list(walk)  # the rest, each node once


# ---- the hub's pick against the reference ----------------------------------------------------


def make_hub(replicas: list[str], *, policy: str, max_builds: int, c: float,
             affinity_keys: int = 0) -> Hub:
    """A hub over one pool of ready replicas; needs a running event loop. Cache affinity is
    off unless asked for: the reference is the ring's pick."""
    settings = config.load(["--replica", "tcp://127.0.0.1:9",
                            "--affinity-keys", str(affinity_keys)], {})
    pool = replace(settings.pools[0], loadbalance=policy, max_builds=max_builds, load_factor=c)
    registry = Registry(Replica(r, "tcp://127.0.0.1:9", ready=True, reason="")
                        for r in replicas)
    return Hub(relay=settings.relay, routing=settings.routing, pools=(pool,),
               registry=registry, ledger=Ledger(),
               control=config.Endpoint("unix", path="/nonexistent"),
               spawn=lambda coro, name: coro.close(),
               metrics=Metrics(CollectorRegistry(), version="test"),
               eject=lambda replica, reason: None, rng=random.Random(0))


def check_pick(hub: Hub, key: str | None, *, internal: bool, ref: str) -> Pick:
    got = hub.pick("default", key, internal=internal, ref=ref, queued=True)
    free, expected = reference_pick(hub, key, internal=internal, ref=ref)
    if not free:
        assert got is WAIT
    elif expected is not None:
        assert got == expected
    else:  # two choices: an open replica, never one more loaded than every other open one
        assert isinstance(got, tuple) and got[1] is Outcome.RANDOM and got[0] in free
        loads = hub.ledger.loads()
        assert len(free) == 1 or any(
            loads.get(o, 0) >= loads.get(got[0], 0) for o in free if o != got[0])
    return got


async def _random_history(data: st.DataObject, hub: Hub, replicas: list[str]) -> None:
    """Builds placed by the hub and started by hand (loads over the limit too), builds ending,
    replicas turning unready or draining and back; every pick checked on the way."""
    refs = [f"ref{i}" for i in range(6)]
    keys = [None, *(f"ctx:/src/p{i}" for i in range(8))]
    for _ in range(data.draw(st.integers(1, 60))):
        step = data.draw(st.sampled_from(["pick", "pick", "pick", "start", "start", "finish",
                                          "flip"]))
        if step == "pick":
            ref = data.draw(st.sampled_from(refs))
            got = check_pick(hub, data.draw(st.sampled_from(keys)),
                             internal=data.draw(st.booleans()), ref=ref)
            if isinstance(got, tuple) and data.draw(st.booleans()):
                hub.ledger.start(ref, got[0], internal=False, now=0.0)
        elif step == "start":
            hub.ledger.start(data.draw(st.sampled_from(refs)), data.draw(st.sampled_from(replicas)),
                             internal=data.draw(st.booleans()), now=0.0)
        elif step == "finish":
            active = [(b.ref, b.replica) for b in hub.ledger.active()]
            if active:
                ref, replica = data.draw(st.sampled_from(active))
                hub.ledger.finish(ref, replica, result="ok", now=0.0)
        else:
            replica = data.draw(st.sampled_from(replicas))
            was = hub.registry.snapshot.by_id[replica]
            change = data.draw(st.sampled_from(["ready", "draining"]))
            hub.registry.update(replica, **{change: not getattr(was, change)})


@settings(max_examples=150, deadline=None)
@given(data=st.data(), size=st.integers(1, 12), max_builds=st.sampled_from([0, 1, 2, 3, 5]),
       c=st.sampled_from([1.0, 1.1, 1.25, 1.5, 2.0]), policy=st.sampled_from(["sticky", "random"]))
def test_hub_pick_answers_as_the_reference(data: st.DataObject, size: int, max_builds: int,
                                           c: float, policy: str) -> None:
    replicas = [f"buildkitd-{i}" for i in range(size)]

    async def scenario() -> None:
        hub = make_hub(replicas, policy=policy, max_builds=max_builds, c=c)
        await _random_history(data, hub, replicas)

    asyncio.run(scenario())


def test_open_share_takes_out_open_excluded_members() -> None:
    loads = {"a": 2, "b": 1, "c": 3}
    members = frozenset({"a", "b", "c"})
    # limit 3: a and b are open (3 builds on them), c is full
    assert open_share((2, 3), members, loads, exclude={"b", "c", "zz"}, limit=3) == (1, 2)
    assert open_share((3, 6), members, loads, exclude={"b"}, limit=0) == (2, 5)


# ---- two choices: draws, and the scan when open candidates are scarce ------------------------


def test_two_choices_without_exclusions_draws_two_distinct_at_once() -> None:
    # nothing excluded, no limit (calls outside builds): the same probabilities as the draws
    loads = {"a": 0, "b": 1, "c": 2, "d": 3}
    rng = random.Random(2024)
    counts = Counter(two_choices(list(loads), loads, rng) for _ in range(6000))
    assert counts["d"] == 0 and set(counts) <= {"a", "b", "c"}
    for node, p in (("a", 3 / 6), ("b", 2 / 6), ("c", 1 / 6)):
        assert abs(counts[node] / 6000 - p) < 0.03, counts
    assert two_choices(["only"], {"only": 9}, rng) == "only"
    assert two_choices(["only"], {"only": 9}, rng, limit=9) is None  # closed: none


@pytest.mark.parametrize("closed", [0, 36])
def test_two_choices_probabilities(closed: int) -> None:
    # four open candidates with loads 0..3: the lighter of a uniform pair is the lightest
    # with p = 3/6, then 2/6, 1/6, never the heaviest; with 36 full candidates besides, half
    # the picks fall back to the scan, with the same probabilities
    loads = {"a": 0, "b": 1, "c": 2, "d": 3} | {f"full{i}": 4 for i in range(closed)}
    rng = random.Random(2024)
    counts = Counter(two_choices(list(loads), loads, rng, limit=4) for _ in range(6000))
    assert counts["d"] == 0 and set(counts) <= {"a", "b", "c", "d"}
    for node, p in (("a", 3 / 6), ("b", 2 / 6), ("c", 1 / 6)):
        assert abs(counts[node] / 6000 - p) < 0.03, counts


def test_two_choices_finds_scarce_open_candidates() -> None:
    rng = random.Random(8)
    loads = {f"n{i}": 2 for i in range(500)}
    loads["n17"], loads["n401"] = 1, 0
    assert {two_choices(list(loads), loads, rng, limit=2) for _ in range(50)} == {"n401"}
    del loads["n401"]
    assert two_choices([*loads, "n401"], loads, rng, limit=2, exclude={"n401"}) == "n17"
    loads["n17"] = 2
    assert two_choices(list(loads), loads, rng, limit=2) is None


def test_hub_internal_pick_without_ref_is_two_choices_over_every_replica() -> None:
    # Calls outside builds (pick_other, internal picks without a Ref): every placeable replica
    # is open, even at its slot limit; the lighter of a uniform distinct pair, as two_choices
    async def scenario() -> None:
        hub = make_hub(["a", "b", "c", "d"], policy="sticky", max_builds=1, c=1.25)
        for i, (replica, n) in enumerate((("b", 1), ("c", 2), ("d", 3))):
            for j in range(n):
                hub.ledger.start(f"r{i}-{j}", replica, internal=False, now=0.0)
        counts = Counter(hub.pick_other("default") for _ in range(6000))
        assert counts["d"] == 0 and set(counts) <= {"a", "b", "c"}
        for node, p in (("a", 3 / 6), ("b", 2 / 6), ("c", 1 / 6)):
            assert abs(counts[node] / 6000 - p) < 0.03, counts
        assert hub.pick("default", None, internal=True, ref="") in {
            ("a", Outcome.RANDOM), ("b", Outcome.RANDOM), ("c", Outcome.RANDOM)}
        one = make_hub(["only"], policy="random", max_builds=1, c=1.25)
        one.ledger.start("x", "only", internal=False, now=0.0)
        assert one.pick_other("default") == "only"
        assert one.pick("default", None, internal=True, ref="") == ("only", Outcome.RANDOM)
        one.registry.update("only", ready=False)
        assert one.pick_other("default") is None
        assert one.pick("default", None, internal=True, ref="") is WAIT

    asyncio.run(scenario())
