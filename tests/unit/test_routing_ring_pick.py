"""gateway/routing/ring.py and pick.py: consistent hashing, bounded loads, two choices."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing import key
from gateway.routing.pick import Outcome, bounded, two_choices
from gateway.routing.ring import HashRing

NODES = ["10.0.0.1:1234", "10.0.0.2:1234", "10.0.0.3:1234"]


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
        assert a.walk(f"k{i}") == b.walk(f"k{i}")


@settings(max_examples=100, deadline=None)
@given(k=st.text(max_size=30), n=st.integers(1, 8))
def test_walk_yields_every_node_once_starting_at_lookup(k: str, n: int) -> None:
    nodes = [f"n{i}" for i in range(n)]
    ring = HashRing(nodes, vnodes=20)
    order = ring.walk(k)
    assert sorted(order) == sorted(nodes)
    assert order[0] == ring.lookup(k)


def test_empty_ring() -> None:
    ring = HashRing([])
    assert ring.walk("x") == []
    assert ring.lookup("x") is None


# ---- bounded loads ---------------------------------------------------------------------------


@pytest.mark.parametrize("builds", [1, 2, 7, 30, 100])
def test_hot_key_respects_the_bound(builds: int) -> None:
    ring = HashRing(NODES)
    order = ring.walk("ctx:/src/hot")
    loads: dict[str, int] = {}
    outcomes = []
    for _ in range(builds):
        picked = bounded(order, loads, c=1.25)
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
    assert bounded(order, {}, c=1.25) == ("a", Outcome.PRIMARY)
    assert bounded(order, {"a": 1, "b": 1, "c": 1}, c=1.25) == ("a", Outcome.PRIMARY)
    # average incl. the new build = 7/3, cap = ceil(2.92) = 3: a (3) is full
    assert bounded(order, {"a": 3, "b": 2, "c": 1}, c=1.25) == ("b", Outcome.SPILL)
    assert bounded(order, {"a": 3, "b": 3, "c": 0}, c=1.25) == ("c", Outcome.SPILL)


@settings(max_examples=200, deadline=None)
@given(loads=st.lists(st.integers(0, 50), min_size=1, max_size=6),
       c=st.floats(1.0, 3.0), excluded=st.sets(st.integers(0, 5), max_size=6))
def test_bounded_never_exceeds_cap(loads: list[int], c: float, excluded: set[int]) -> None:
    order = [f"n{i}" for i in range(len(loads))]
    load_map = dict(zip(order, loads, strict=True))
    exclude = {f"n{i}" for i in excluded}
    picked = bounded(order, load_map, c=c, exclude=exclude)
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
    assert bounded(order, {}, c=1.25, exclude={"a"}) == ("b", Outcome.PRIMARY)
    assert bounded(order, {}, c=1.25, exclude={"a", "b"}) == ("c", Outcome.PRIMARY)
    assert bounded(order, {}, c=1.25, exclude=set(order)) is None
    assert bounded([], {}, c=1.25) is None


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
