"""gateway/builds/ledger.py: active builds, loads, Ref owners, bounded history."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.builds.ledger import BuildRecord, Ledger


def test_loads_count_only_active_non_internal_builds() -> None:
    led = Ledger()
    led.start("r1", "A", internal=False, now=1.0)
    led.start("r2", "A", internal=False, now=1.0)
    led.start("probe", "A", internal=True, now=1.0)
    led.start("probe2", "B", internal=True, now=1.0)
    led.start("r3", "C", internal=False, now=1.0)
    assert led.loads() == {"A": 2, "C": 1}
    led.finish("r1", "A", result="ok", now=2.0)
    led.finish("probe2", "B", result="ok", now=2.0)
    assert led.loads() == {"A": 1, "C": 1}
    led.finish("r3", "C", result="ok", now=2.0)
    assert led.loads() == {"A": 1}  # replicas with no builds are absent


def test_duplicate_start_and_unknown_finish_are_ignored() -> None:
    led = Ledger()
    led.start("r1", "A", internal=False, now=1.0)
    led.start("r1", "A", internal=False, now=2.0)
    assert led.loads() == {"A": 1}
    assert [b.started for b in led.active()] == [1.0]
    assert led.finish("nope", "A", result="ok", now=3.0) is None
    assert led.finish("r1", "B", result="ok", now=3.0) is None
    assert led.finish("r1", "A", result="ok", now=3.0) is not None
    assert led.finish("r1", "A", result="ok", now=4.0) is None
    assert led.loads() == {}
    assert len(list(led.finished())) == 1


def test_running_on_for_a_ref_on_two_replicas() -> None:
    led = Ledger()
    led.start("multi", "A", internal=False, now=0.0)  # buildx multi-node: one Ref, two nodes
    led.start("multi", "B", internal=False, now=0.0)
    assert led.running_on("multi") == frozenset({"A", "B"})
    assert led.loads() == {"A": 1, "B": 1}
    led.finish("multi", "A", result="ok", now=5.0)
    assert led.running_on("multi") == frozenset({"B"})
    assert led.owner("multi") is None  # still running on B
    led.finish("multi", "B", result="ok", now=6.0)
    assert led.running_on("multi") == frozenset()
    assert led.owner("multi") == "B"
    assert led.running_on("never") == frozenset()


def test_owner_only_for_finished_builds_and_not_while_running_again() -> None:
    led = Ledger()
    led.start("r", "A", internal=False, now=0.0)
    assert led.owner("r") is None
    led.finish("r", "A", result="ok", now=1.0)
    assert led.owner("r") == "A"
    led.start("r", "B", internal=False, now=2.0)  # the Ref runs again
    assert led.owner("r") is None
    led.finish("r", "B", result="CANCELLED", now=3.0)
    assert led.owner("r") == "B"


def test_internal_builds_have_no_owner() -> None:
    led = Ledger()
    led.start("probe", "A", internal=True, now=0.0)
    led.finish("probe", "A", result="ok", now=1.0)
    assert led.owner("probe") is None
    assert [b.ref for b in led.finished()] == ["probe"]


def test_finish_records_result_and_duration() -> None:
    led = Ledger()
    led.start("r", "A", internal=False, now=10.0)
    (active,) = led.active()
    assert active == BuildRecord("r", "A", False, 10.0)
    assert active.duration is None
    done = led.finish("r", "A", result="replica-lost", now=12.5)
    assert done == BuildRecord("r", "A", False, 10.0, 12.5, "replica-lost")
    assert done is not None and done.duration == 2.5
    assert list(led.active()) == []
    assert list(led.finished()) == [done]


def test_history_and_owners_are_bounded() -> None:
    led = Ledger(keep_finished=3, keep_owners=2)
    for i in range(5):
        led.start(f"r{i}", f"R{i}", internal=False, now=float(i))
        led.finish(f"r{i}", f"R{i}", result="ok", now=float(i) + 0.5)
    assert [b.ref for b in led.finished()] == ["r2", "r3", "r4"]
    assert [led.owner(f"r{i}") for i in range(5)] == [None, None, None, "R3", "R4"]


def test_owner_eviction_keeps_the_most_recently_finished() -> None:
    led = Ledger(keep_owners=2)
    for ref, rep in (("a", "A"), ("b", "B"), ("a", "A2"), ("c", "C")):
        led.start(ref, rep, internal=False, now=0.0)
        led.finish(ref, rep, result="ok", now=1.0)
    # "a" finished again after "b": "b" is the oldest and goes first
    assert led.owner("a") == "A2"
    assert led.owner("b") is None
    assert led.owner("c") == "C"


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from(["r1", "r2", "r3"]),
                              st.sampled_from(["A", "B"]), st.booleans()), max_size=40))
def test_loads_match_active_records(ops: list[tuple[bool, str, str, bool]]) -> None:
    led = Ledger()
    for t, (is_start, ref, rep, internal) in enumerate(ops):
        if is_start:
            led.start(ref, rep, internal=internal, now=float(t))
        else:
            led.finish(ref, rep, result="ok", now=float(t))
        expected: dict[str, int] = {}
        running: dict[str, set[str]] = {}
        for b in led.active():
            running.setdefault(b.ref, set()).add(b.replica)
            if not b.internal:
                expected[b.replica] = expected.get(b.replica, 0) + 1
        assert led.loads() == expected
        for ref in ("r1", "r2", "r3"):
            assert led.running_on(ref) == frozenset(running.get(ref, ()))
            if running.get(ref):
                assert led.owner(ref) is None


def _tally_by_hand(led: Ledger, replicas: frozenset[str], limit: int) -> tuple[int, int]:
    loads = led.loads()
    open_ = [r for r in replicas if not limit or loads.get(r, 0) < limit]
    return len(open_), sum(loads.get(r, 0) for r in open_)


def test_tally_counts_open_replicas_and_their_builds() -> None:
    led = Ledger()
    pool = frozenset({"A", "B", "C"})
    assert led.tally(pool, limit=2) == (3, 0)
    led.start("r1", "A", internal=False, now=0.0)
    led.start("r2", "A", internal=False, now=0.0)  # A reaches the limit: no longer open
    led.start("r3", "B", internal=False, now=0.0)
    led.start("probe", "C", internal=True, now=0.0)  # internal builds are no load
    led.start("r4", "D", internal=False, now=0.0)  # not in the set
    assert led.tally(pool, limit=2) == (2, 1)
    assert led.tally(pool) == (3, 3)  # no limit: every replica is open
    led.finish("r1", "A", result="ok", now=1.0)  # A is open again, with its one build
    assert led.tally(pool, limit=2) == (3, 2)
    assert led.tally(pool) == (3, 2)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from(["r1", "r2", "r3", "r4"]),
                              st.sampled_from(["A", "B", "C"]), st.booleans(),
                              st.integers(0, 5)), max_size=60),
       keep=st.integers(1, 4))
def test_tallies_kept_up_to_date_match_a_count_by_hand(
    ops: list[tuple[bool, str, str, bool, int]], keep: int
) -> None:
    # sets and limits asked about in turn, more of them than the ledger keeps: evicted pairs
    # are counted again, kept ones follow every start and finish
    asks = [(frozenset(s), limit) for s in ("A", "AB", "BC", "ABC") for limit in (0, 1, 2)]
    led = Ledger(keep_tallies=keep)
    for t, (is_start, ref, rep, internal, ask) in enumerate(ops):
        if is_start:
            led.start(ref, rep, internal=internal, now=float(t))
        else:
            led.finish(ref, rep, result="ok", now=float(t))
        for replicas, limit in asks[ask::5]:
            assert led.tally(replicas, limit=limit) == _tally_by_hand(led, replicas, limit)
