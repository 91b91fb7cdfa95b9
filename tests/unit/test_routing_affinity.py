"""Cache affinity: the memory (routing/affinity.py) and the hub's sticky pick using it."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.replicas.registry import Replica
from gateway.routing import affinity
from gateway.routing.affinity import Entry, Memory
from gateway.routing.pick import Outcome
from gateway.routing.ring import HashRing
from tests.unit.test_routing_ring_pick import make_hub


def test_memory_is_a_bounded_lru_of_the_last_replica() -> None:
    memory = Memory(3)
    for i, replica in enumerate(["a", "b", "c", "a"]):
        memory.remember(f"k{i}", replica, now=float(i))
    assert len(memory) == 3 and memory.last("k0") is None  # the oldest went
    memory.remember("k1", "z", now=9.0)  # k1 used again: the most recent now
    memory.remember("k4", "d", now=10.0)
    assert memory.last("k1") == "z" and memory.last("k2") is None
    assert [e.digest for e in memory.recent(5)] == ["k3", "k1", "k4"]
    assert [e.digest for e in memory.recent(2)] == ["k1", "k4"]


def test_merge_keeps_the_newer_entry_of_a_key() -> None:
    memory = Memory(10)
    memory.remember("k", "mine", now=100.0)
    version = memory.version
    assert memory.merge([Entry("k", "theirs", 99.0)]) == 0  # older: mine stays
    assert memory.version == version
    assert memory.merge([Entry("k", "theirs", 101.0), Entry("j", "x", 5.0)]) == 2
    assert memory.last("k") == "theirs" and memory.last("j") == "x"


def test_zero_capacity_remembers_nothing() -> None:
    memory = Memory(0)
    memory.remember("k", "a", now=1.0)
    assert memory.merge([Entry("j", "b", 1.0)]) == 0
    assert len(memory) == 0 and memory.last("k") is None


@settings(max_examples=200, deadline=None)
@given(rows=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=4), max_leaves=12))
def test_decode_skips_what_is_not_an_entry(rows: object) -> None:
    for entry in affinity.decode(rows):
        assert isinstance(entry.digest, str) and isinstance(entry.replica, str)


def test_entries_round_trip_through_json_rows() -> None:
    entries = [Entry(affinity.digest("default", "ctx:/src/a"), "buildkitd-0", 1700000000.0)]
    assert affinity.decode(affinity.encode(entries)) == entries
    assert len(entries[0].digest) == 16
    assert affinity.digest("default", "k") != affinity.digest("other", "k")


def _grow(hub_replicas: list[str]) -> list[Replica]:
    return [Replica(r, "tcp://127.0.0.1:9", ready=True, reason="") for r in hub_replicas]


def test_keys_go_back_to_their_replica_after_a_scale_up() -> None:
    # 50 keys built on 2 replicas; the pool grows to 4; the same 50 keys again
    keys = [f"ctx:/src/repo-{i}" for i in range(50)]
    before, after = ["buildkitd-0", "buildkitd-1"], [f"buildkitd-{i}" for i in range(4)]

    async def scenario(affinity_keys: int) -> tuple[int, dict[str, float]]:
        hub = make_hub(before, policy="sticky", max_builds=0, c=1.25,
                       affinity_keys=affinity_keys)
        first = {}
        for k in keys:
            got = hub.pick("default", k, internal=False, ref=f"r-{k}")
            assert isinstance(got, tuple)
            first[k] = got[0]
        hub.registry.replace_all(_grow(after))
        same = 0
        for k in keys:
            got = hub.pick("default", k, internal=False, ref=f"r2-{k}")
            assert isinstance(got, tuple)
            same += got[0] == first[k]
        counts = {result: hub.metrics.affinity.labels("default", result)._value.get()
                  for result in ("hit", "miss", "new")}
        return same, counts

    same, counts = asyncio.run(scenario(10_000))
    plain, plain_counts = asyncio.run(scenario(0))
    ring_moved = sum(HashRing(before).lookup(k) != HashRing(after).lookup(k) for k in keys)
    print(f"\n50 keys, 2 -> 4 replicas: {same}/50 back on their replica with affinity, "
          f"{plain}/50 with the ring alone ({ring_moved} moved by the ring)")
    assert same >= 48  # at least 95%
    assert counts == {"hit": 50.0, "miss": 0.0, "new": 50.0}  # hit ratio 1.0
    assert ring_moved >= 15 and plain == 50 - ring_moved  # about half move without memory
    assert plain_counts == {"hit": 0.0, "miss": 0.0, "new": 0.0}  # off: not counted


def test_a_full_or_gone_replica_gives_the_key_to_the_ring() -> None:
    async def scenario() -> None:
        hub = make_hub(["buildkitd-0", "buildkitd-1"], policy="sticky", max_builds=1, c=1.25,
                       affinity_keys=100)
        name = affinity.digest("default", "ctx:/a")
        ring_pick = HashRing(["buildkitd-0", "buildkitd-1"]).lookup("ctx:/a")
        other = next(r for r in ("buildkitd-0", "buildkitd-1") if r != ring_pick)
        hub.affinity.remember(name, other, now=1.0)
        assert hub.pick("default", "ctx:/a", internal=False, ref="r1") == (
            other, Outcome.AFFINITY)
        hub.ledger.start("busy", other, internal=False, now=0.0)  # its one slot taken
        assert hub.pick("default", "ctx:/a", internal=False, ref="r2") == (
            ring_pick, Outcome.PRIMARY)
        assert hub.affinity.last(name) == ring_pick  # the build's place is the memory now
        hub.affinity.remember(name, "buildkitd-9", now=2.0)  # a replica that left the pool
        assert hub.pick("default", "ctx:/a", internal=False, ref="r3") == (
            ring_pick, Outcome.PRIMARY)
        counts = {result: hub.metrics.affinity.labels("default", result)._value.get()
                  for result in ("hit", "miss", "new")}
        assert counts == {"hit": 1.0, "miss": 2.0, "new": 0.0}

    asyncio.run(scenario())
