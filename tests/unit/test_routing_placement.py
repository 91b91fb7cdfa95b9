"""gateway/routing/placement.py: per-connection build placement (pure state machine)."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.buildkit.wire import SolveInfo
from gateway.routing.pick import Outcome
from gateway.routing.placement import NO_REPLICA, ConnectionPlacement, Fail, Placed, Route

SESSION_WAIT = 1.0
HOLD = 5.0


class FakePicker:
    """Records calls; answers from `choose(key, internal, ref)` (None: no replica)."""

    def __init__(self, choose: Callable[[str | None, bool, str], str | None] | str | None):
        self.calls: list[tuple[str | None, bool, str]] = []
        self._choose = choose if callable(choose) else (lambda k, i, r: choose)

    def __call__(self, key: str | None, *, internal: bool, ref: str) -> tuple[str, Outcome] | None:
        self.calls.append((key, internal, ref))
        replica = self._choose(key, internal, ref)
        return None if replica is None else (replica, Outcome.PRIMARY)


def no_owner(ref: str) -> str | None:
    return None


def conn(*, authority: str = "10.0.0.9:1234", client: str | None = "10.1.1.1") -> (
    ConnectionPlacement
):
    return ConnectionPlacement(authority=authority, client=client, session_wait=SESSION_WAIT,
                               hold_timeout=HOLD)


def solve(ref: str, session: str = "", *, internal: bool = False,
          shared: tuple[str, ...] = ()) -> SolveInfo:
    return SolveInfo(ref, session, internal, shared)


def routes(decisions: list) -> dict[int, str]:
    out: dict[int, str] = {}
    for d in decisions:
        if isinstance(d, Route):
            assert d.stream not in out
            out[d.stream] = d.replica
    return out


def fails(decisions: list) -> set[int]:
    return {d.stream for d in decisions if isinstance(d, Fail)}


# ---- holding and releasing -------------------------------------------------------------------


def test_session_before_solve_is_held_and_released_to_the_solve_replica() -> None:
    cp = conn()
    pick = FakePicker("A")
    assert cp.session(1, "s1", "/src/app:0a1b2c3d4e5f6071", 0.0, pick) == []
    assert cp.waiting() == 1
    d = cp.solve(3, solve("ref1", "s1"), 0.01, pick)
    assert d[0] == Placed(3, "A", "ref1", False, Outcome.PRIMARY)
    assert routes(d) == {3: "A", 1: "A"}
    assert pick.calls == [("ctx:/src/app", False, "ref1")]
    assert cp.waiting() == 0
    assert cp.bound == "A"


def test_status_and_llb_before_solve_are_held_and_released() -> None:
    cp = conn()
    pick = FakePicker("B")
    assert cp.follower(5, "ref1", 0.0, no_owner) == []  # Status
    assert cp.follower(7, "ref1", 0.0, no_owner) == []  # LLBBridge (buildid header)
    assert cp.session(1, "s1", "app:00", 0.0, pick) == []
    d = cp.solve(3, solve("ref1", "s1"), 0.02, pick)
    assert routes(d) == {3: "B", 5: "B", 7: "B", 1: "B"}
    # Placed comes before the Solve's own Route (the ledger records the build first)
    assert d.index(Placed(3, "B", "ref1", False, Outcome.PRIMARY)) < d.index(Route(3, "B"))


def test_first_solve_binds_and_later_builds_follow() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: {"r1": "A", "r2": "C"}[r])
    cp.session(1, "s1", "one:00", 0.0, pick)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    assert cp.bound == "A"
    pick.calls.clear()
    assert cp.session(9, "s2", "two:00", 1.0, pick) == [Route(9, "A")]
    d = cp.solve(11, solve("r2", "s2"), 1.0, pick)
    assert d == [Placed(11, "A", "r2", False, Outcome.BOUND), Route(11, "A")]
    assert cp.follower(13, "r2", 1.0, no_owner) == [Route(13, "A")]
    assert cp.follower(15, "unknown-ref", 1.0, no_owner) == [Route(15, "A")]
    assert cp.other(17, pick) == [Route(17, "A")]
    assert pick.calls == []  # nothing is picked once bound


def test_binding_releases_every_held_stream_at_once() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.follower(5, "ref-of-a-later-build", 0.0, no_owner)
    cp.session(7, "unnamed-session", "x:0", 0.0, pick)
    cp.session(1, "s1", "a:0", 0.0, pick)
    d = cp.solve(3, solve("r1", "s1"), 0.1, pick)
    assert routes(d) == {3: "A", 1: "A", 5: "A", 7: "A"}
    assert cp.waiting() == 0


def test_internal_probe_is_placed_with_internal_and_does_not_bind() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: "P" if i else "R")
    # buildx probe: Session (empty sharedkey), Solve(Internal), Status, LLB Ping
    assert cp.session(1, "probe-s", "", 0.0, pick) == []
    assert cp.follower(5, "probe-ref", 0.0, no_owner) == []
    d = cp.solve(3, solve("probe-ref", "probe-s", internal=True), 0.0, pick)
    assert d[0] == Placed(3, "P", "probe-ref", True, Outcome.PRIMARY)
    assert routes(d) == {3: "P", 1: "P", 5: "P"}
    assert pick.calls == [(None, True, "probe-ref")]
    assert cp.bound is None
    assert cp.follower(7, "probe-ref", 0.1, no_owner) == [Route(7, "P")]
    # the real build then binds through its own key
    cp.session(9, "real-s", "/w/app:1234567890abcdef", 0.2, pick)
    d = cp.solve(11, solve("real-ref", "real-s"), 0.2, pick)
    assert routes(d) == {11: "R", 9: "R"}
    assert pick.calls[-1] == ("ctx:/w/app", False, "real-ref")
    assert cp.bound == "R"


def test_internal_solve_after_binding_follows_the_binding() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.session(1, "s", "k:0", 0.0, pick)
    cp.solve(3, solve("r", "s"), 0.0, pick)
    d = cp.solve(5, solve("probe", "ps", internal=True), 1.0, pick)
    assert d == [Placed(5, "A", "probe", True, Outcome.BOUND), Route(5, "A")]


# ---- waiting for the session and the fallback key -------------------------------------------


def test_solve_with_unknown_session_waits_then_uses_authority_name() -> None:
    cp = conn(authority="Builders.Example:1234", client="10.1.1.1")
    pick = FakePicker("A")
    assert cp.solve(3, solve("r1", "s-late"), 10.0, pick) == []
    assert cp.waiting() == 1
    assert cp.deadline() == 10.0 + SESSION_WAIT
    assert cp.expire(10.5, pick, no_owner) == []
    assert pick.calls == []
    d = cp.expire(10.0 + SESSION_WAIT, pick, no_owner)
    assert routes(d) == {3: "A"}
    assert pick.calls == [("host:builders.example", False, "r1")]
    # the session that comes late follows the placed build
    assert cp.session(1, "s-late", "app:00", 12.0, pick) == [Route(1, "A")]


def test_solve_with_unknown_session_falls_back_to_client_when_authority_is_an_ip() -> None:
    cp = conn(authority="127.0.0.1:1234", client="CN=runner-7")
    pick = FakePicker("A")
    cp.solve(3, solve("r1", "never"), 0.0, pick)
    cp.expire(5.0, pick, no_owner)
    assert pick.calls == [("client:CN=runner-7", False, "r1")]


def test_solve_with_no_key_at_all_picks_with_none() -> None:
    cp = conn(authority="[::1]:1234", client=None)
    pick = FakePicker("A")
    cp.solve(3, solve("r1", "s"), 0.0, pick)
    cp.expire(1.0, pick, no_owner)
    assert pick.calls == [(None, False, "r1")]


def test_session_arriving_in_time_gives_the_context_key() -> None:
    cp = conn(authority="gw.example:1234")
    pick = FakePicker("A")
    assert cp.solve(3, solve("r1", "s1"), 0.0, pick) == []
    d = cp.session(1, "s1", "/home/ci/repo:0a1b2c3d4e5f6071", 0.3, pick)
    assert routes(d) == {3: "A", 1: "A"}
    assert pick.calls == [("ctx:/home/ci/repo", False, "r1")]


def test_session_with_empty_sharedkey_uses_fallback_at_once() -> None:
    cp = conn(authority="gw.example:1234")
    pick = FakePicker("A")
    cp.session(1, "s1", "", 0.0, pick)  # buildctl: no sharedkey
    d = cp.solve(3, solve("r1", "s1"), 0.0, pick)
    assert routes(d) == {3: "A", 1: "A"}
    assert pick.calls == [("host:gw.example", False, "r1")]


def test_pending_solves_are_decided_in_arrival_order() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: {"r1": "A", "r2": "B"}[r])
    assert cp.solve(3, solve("r1", "s1"), 0.0, pick) == []
    assert cp.solve(5, solve("r2", "s2"), 0.0, pick) == []
    # the second build's session first: the first Solve still decides the binding
    assert cp.session(7, "s2", "two:0", 0.1, pick) == []
    d = cp.session(9, "s1", "one:0", 0.2, pick)
    assert routes(d) == {3: "A", 5: "A", 7: "A", 9: "A"}
    assert Placed(5, "A", "r2", False, Outcome.BOUND) in d
    assert [c[2] for c in pick.calls] == ["r1"]


# ---- hold timeout ------------------------------------------------------------------------------


def test_held_status_past_timeout_goes_to_the_finished_owner() -> None:
    cp = conn()
    pick = FakePicker("X")
    owners: dict[str, str] = {}
    assert cp.follower(5, "old-ref", 0.0, owners.get) == []
    assert cp.deadline() == HOLD
    assert cp.expire(HOLD - 0.01, pick, owners.get) == []
    owners["old-ref"] = "B"  # e.g. the ledger learnt it meanwhile
    assert cp.expire(HOLD, pick, owners.get) == [Route(5, "B")]
    assert pick.calls == []


def test_follower_of_a_known_finished_ref_is_routed_at_once() -> None:
    cp = conn()
    assert cp.follower(5, "done", 0.0, {"done": "C"}.get) == [Route(5, "C")]


def test_held_streams_past_timeout_without_owner_are_picked_by_key() -> None:
    cp = conn(authority="gw.example:1234")
    pick = FakePicker("K")
    cp.follower(5, "orphan", 0.0, no_owner)
    cp.session(7, "lonely", "/src/x:00ff", 1.0, pick)
    assert cp.deadline() == HOLD
    d = cp.expire(HOLD, pick, no_owner)
    assert d == [Route(5, "K")]
    assert pick.calls == [("host:gw.example", True, "")]
    d = cp.expire(1.0 + HOLD, pick, no_owner)
    assert d == [Route(7, "K")]
    # a held session uses its own sharedkey's context part
    assert pick.calls[-1] == ("ctx:/src/x", True, "")
    assert cp.deadline() is None
    assert cp.bound is None  # fallback routes never bind


def test_held_stream_past_timeout_with_no_replica_fails() -> None:
    cp = conn()
    cp.follower(5, "orphan", 0.0, no_owner)
    assert cp.expire(HOLD, FakePicker(None), no_owner) == [Fail(5, NO_REPLICA)]


def test_other_calls_pick_by_fallback_key_as_internal() -> None:
    cp = conn(authority="gw.example")
    pick = FakePicker("A")
    assert cp.other(3, pick) == [Route(3, "A")]
    assert pick.calls == [("host:gw.example", True, "")]
    assert cp.other(5, FakePicker(None)) == [Fail(5, NO_REPLICA)]
    assert cp.bound is None


# ---- no replica ------------------------------------------------------------------------------


def test_no_replica_fails_the_solve_and_its_held_followers_only() -> None:
    cp = conn()
    pick = FakePicker(None)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.session(2, "shared", "a:0", 0.0, pick)
    cp.follower(5, "r1", 0.0, no_owner)
    cp.follower(7, "other-ref", 0.0, no_owner)
    d = cp.solve(3, solve("r1", "s1", shared=("shared",)), 0.0, pick)
    assert set(d) == {Fail(3, NO_REPLICA), Fail(1, NO_REPLICA), Fail(2, NO_REPLICA),
                      Fail(5, NO_REPLICA)}
    assert cp.bound is None
    assert cp.waiting() == 1  # stream 7 still waits for its own Solve


def test_no_replica_for_internal_probe() -> None:
    cp = conn()
    cp.follower(5, "probe", 0.0, no_owner)
    d = cp.solve(3, solve("probe", "ps", internal=True), 0.0, FakePicker(None))
    assert set(d) == {Fail(3, NO_REPLICA), Fail(5, NO_REPLICA)}


def test_failed_pending_solve_lets_the_next_one_bind() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: None if r == "r1" else "B")
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.solve(5, solve("r2", "s2"), 0.0, pick)
    cp.session(7, "s2", "b:0", 0.0, pick)
    d = cp.session(9, "s1", "a:0", 0.0, pick)
    assert Fail(3, NO_REPLICA) in d
    assert Fail(9, NO_REPLICA) in d
    assert routes(d) == {5: "B", 7: "B"}
    assert cp.bound == "B"


# ---- forget and deadline -----------------------------------------------------------------------


def test_forget_removes_a_held_stream() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.follower(5, "r1", 0.0, no_owner)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.forget(5)
    assert cp.waiting() == 1
    d = cp.solve(3, solve("r1", "s1"), 0.0, pick)
    assert 5 not in routes(d)
    assert routes(d) == {3: "A", 1: "A"}


def test_forget_removes_a_pending_solve() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.solve(5, solve("r2", "s2"), 0.5, pick)
    cp.forget(3)
    assert cp.waiting() == 1
    assert cp.deadline() == 0.5 + SESSION_WAIT
    d = cp.session(1, "s2", "b:0", 0.6, pick)
    assert routes(d) == {5: "A", 1: "A"}
    assert [c[2] for c in pick.calls] == ["r2"]
    assert cp.expire(100.0, pick, no_owner) == []


def test_deadline_reports_the_earliest() -> None:
    cp = conn()
    pick = FakePicker("A")
    assert cp.deadline() is None
    cp.follower(5, "r9", 3.0, no_owner)
    assert cp.deadline() == 3.0 + HOLD
    cp.solve(3, solve("r1", "s1"), 4.0, pick)
    assert cp.deadline() == 4.0 + SESSION_WAIT
    cp.session(7, "sx", "", 4.5, pick)
    assert cp.deadline() == 4.0 + SESSION_WAIT
    cp.forget(3)
    assert cp.deadline() == 3.0 + HOLD


# ---- bake ----------------------------------------------------------------------------------------


def test_bake_targets_sharing_a_session_land_on_one_replica() -> None:
    cp = conn()
    # each target has its own key; a router without binding would split them
    pick = FakePicker(lambda k, i, r: {"ctx:/src/web": "A", "ctx:/src/api": "B"}.get(k or "", "Z"))
    streams = [
        cp.session(1, "sh", "/src/web:00", 0.0, pick),  # shared session, first target's key
        cp.session(3, "s-web", "/src/web:00", 0.0, pick),
        cp.session(5, "s-api", "/src/api:00", 0.0, pick),
        cp.follower(7, "ref-api", 0.0, no_owner),
        cp.solve(9, solve("ref-api", "s-api", shared=("sh",)), 0.01, pick),
        cp.follower(11, "ref-web", 0.01, no_owner),
        cp.solve(13, solve("ref-web", "s-web", shared=("sh",)), 0.02, pick),
    ]
    decided = routes([d for ds in streams for d in ds])
    assert set(decided) == {1, 3, 5, 7, 9, 11, 13}
    assert len(set(decided.values())) == 1
    assert decided[9] == "B"


# ---- whole connections: exactly one decision per stream ------------------------------------


@dataclass
class _Build:
    ref: str
    session: str
    sharedkey: str
    internal: bool
    shared: tuple[str, ...]


def _events(builds: list[_Build]) -> list[tuple[str, int, _Build]]:
    events = []
    for b in builds:
        events += [("session", 0, b), ("solve", 0, b), ("status", 0, b), ("llb", 0, b)]
    if any(b.shared for b in builds):
        events.append(("shared", 0, builds[-1]))
    return events


@settings(max_examples=150, deadline=None)
@given(
    n_builds=st.integers(1, 4),
    probe=st.booleans(),
    with_shared=st.booleans(),
    data=st.data(),
)
def test_every_stream_gets_one_decision_and_follows_its_build(
    n_builds: int, probe: bool, with_shared: bool, data: st.DataObject
) -> None:
    builds = [_Build(f"ref{i}", f"sess{i}", f"/src/d{i}:{i:016x}", False,
                     ("shared",) if with_shared else ()) for i in range(n_builds)]
    if probe:
        builds.insert(0, _Build("probe", "probe-sess", "", True, ()))
    events = data.draw(st.permutations(_events(builds)), label="order")
    gaps = data.draw(st.lists(st.floats(0, 0.05), min_size=len(events),
                              max_size=len(events)), label="gaps")
    pick = FakePicker(lambda k, i, r: "P" if i else f"R{zlib.crc32((k or '').encode()) % 3}")
    cp = conn()
    decisions: list = []
    kinds: dict[int, tuple[str, _Build]] = {}
    now = 0.0
    for sid, ((kind, _, b), gap) in enumerate(zip(events, gaps, strict=True), start=1):
        now += gap
        kinds[sid] = (kind, b)
        if kind == "session":
            decisions += cp.session(sid, b.session, b.sharedkey, now, pick)
        elif kind == "shared":
            decisions += cp.session(sid, "shared", b.sharedkey, now, pick)
        elif kind == "solve":
            decisions += cp.solve(sid, SolveInfo(b.ref, b.session, b.internal, b.shared), now,
                                  pick)
        else:
            decisions += cp.follower(sid, b.ref, now, no_owner)
        decisions += cp.expire(now, pick, no_owner)
    # Every Solve and Session arrived within session_wait: nothing may still wait.
    assert cp.waiting() == 0
    assert cp.deadline() is None
    assert cp.expire(now + 100, pick, no_owner) == []

    counted = Counter(d.stream for d in decisions if isinstance(d, Route | Fail))
    assert counted == Counter(kinds.keys())  # every stream exactly once
    assert not any(isinstance(d, Fail) for d in decisions)
    placed = {d.ref: d for d in decisions if isinstance(d, Placed)}
    assert len(placed) == len(builds)
    assert len([d for d in decisions if isinstance(d, Placed)]) == len(builds)
    where = routes(decisions)
    for sid, (kind, b) in kinds.items():
        if kind == "shared":
            assert where[sid] == cp.bound
        else:
            assert where[sid] == placed[b.ref].replica, (kind, b.ref)
    # real builds all on the bound replica; at most one non-internal pick
    real = [b for b in builds if not b.internal]
    assert {placed[b.ref].replica for b in real} == {cp.bound}
    assert len([c for c in pick.calls if not c[1]]) == 1
    first_key, _, first_ref = next(c for c in pick.calls if not c[1])
    first = next(b for b in real if b.ref == first_ref)
    assert first_key == "ctx:" + first.sharedkey.rsplit(":", 1)[0]
    assert placed[first_ref].outcome is Outcome.PRIMARY
    assert all(placed[b.ref].outcome is Outcome.BOUND for b in real if b.ref != first_ref)


@settings(max_examples=60, deadline=None)
@given(n_builds=st.integers(1, 3), data=st.data())
def test_without_replicas_every_stream_fails_exactly_once(n_builds: int, data: st.DataObject
                                                          ) -> None:
    builds = [_Build(f"ref{i}", f"sess{i}", f"/d{i}:00", i == 0, ()) for i in range(n_builds)]
    events = data.draw(st.permutations(_events(builds)), label="order")
    pick = FakePicker(None)
    cp = conn()
    decisions: list = []
    for sid, (kind, _, b) in enumerate(events, start=1):
        if kind == "session":
            decisions += cp.session(sid, b.session, b.sharedkey, 0.0, pick)
        elif kind == "solve":
            decisions += cp.solve(sid, SolveInfo(b.ref, b.session, b.internal, ()), 0.0, pick)
        else:
            decisions += cp.follower(sid, b.ref, 0.0, no_owner)
    decisions += cp.expire(1000.0, pick, no_owner)
    assert all(isinstance(d, Fail) for d in decisions)
    assert Counter(d.stream for d in decisions) == Counter(range(1, len(events) + 1))
