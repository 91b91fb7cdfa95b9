"""gateway/routing/placement.py: per-connection build placement (pure state machine)."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway import errors
from gateway.buildkit.wire import SolveInfo
from gateway.routing.pick import Outcome
from gateway.routing.placement import (
    NO_REPLICA,
    WAIT,
    ConnectionPlacement,
    Enqueue,
    Fail,
    Pick,
    Placed,
    Route,
    Unlocated,
    Wait,
    Waiting,
)

SESSION_WAIT = 1.0
HOLD = 5.0

Answer = str | Wait | None  # a replica, WAIT (no free slot now), None (never)


class FakePicker:
    """Records calls as (key, internal, ref, target).

    An untargeted call is answered by `choose(key, internal, ref)`; a call for a bound
    connection's replica by `on_target(target, internal, ref)`, by default the target itself
    (it has a free slot). A replica name becomes (name, PRIMARY) or (target, BOUND).
    """

    def __init__(self, choose: Callable[[str | None, bool, str], Answer] | Answer,
                 on_target: Callable[[str, bool, str], Answer] | None = None) -> None:
        self.calls: list[tuple[str | None, bool, str, str | None]] = []
        self._choose = choose if callable(choose) else (lambda k, i, r: choose)
        self._on_target = on_target

    def __call__(self, key: str | None, *, internal: bool, ref: str,
                 target: str | None = None) -> Pick:
        self.calls.append((key, internal, ref, target))
        if target is not None:
            answer = target if self._on_target is None else self._on_target(target, internal, ref)
            return (answer, Outcome.BOUND) if isinstance(answer, str) else answer
        answer = self._choose(key, internal, ref)
        return (answer, Outcome.PRIMARY) if isinstance(answer, str) else answer


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


def failed(decisions: list) -> dict[int, tuple[type, str]]:
    """Failed streams with their error's class and message (errors compare by identity)."""
    out: dict[int, tuple[type, str]] = {}
    for d in decisions:
        if isinstance(d, Fail):
            assert d.stream not in out
            out[d.stream] = (type(d.error), d.error.message)
    return out


NOREP = (errors.NoReplica, NO_REPLICA)


# ---- holding and releasing -------------------------------------------------------------------


def test_session_before_solve_is_held_and_released_to_the_solve_replica() -> None:
    cp = conn()
    pick = FakePicker("A")
    assert cp.session(1, "s1", "/src/app:0a1b2c3d4e5f6071", 0.0, pick) == []
    assert cp.waiting() == 1
    d = cp.solve(3, solve("ref1", "s1"), 0.01, pick)
    assert d[0] == Placed(3, "A", "ref1", False, Outcome.PRIMARY)
    assert routes(d) == {3: "A", 1: "A"}
    assert pick.calls == [("ctx:/src/app", False, "ref1", None)]
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
    # once bound, a build is only picked for the bound replica (a free slot there); the
    # followers and other calls pick nothing
    assert pick.calls == [(None, False, "r2", "A")]


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
    assert pick.calls == [(None, True, "probe-ref", None)]
    assert cp.bound is None
    assert cp.follower(7, "probe-ref", 0.1, no_owner) == [Route(7, "P")]
    # the real build then binds through its own key
    cp.session(9, "real-s", "/w/app:1234567890abcdef", 0.2, pick)
    d = cp.solve(11, solve("real-ref", "real-s"), 0.2, pick)
    assert routes(d) == {11: "R", 9: "R"}
    assert pick.calls[-1] == ("ctx:/w/app", False, "real-ref", None)
    assert cp.bound == "R"


def test_internal_solve_after_binding_follows_the_binding() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.session(1, "s", "k:0", 0.0, pick)
    cp.solve(3, solve("r", "s"), 0.0, pick)
    d = cp.solve(5, solve("probe", "ps", internal=True), 1.0, pick)
    assert d == [Placed(5, "A", "probe", True, Outcome.BOUND), Route(5, "A")]
    assert pick.calls[-1] == (None, True, "probe", "A")
    assert cp.bound == "A"


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
    assert pick.calls == [("host:builders.example", False, "r1", None)]
    # the session that comes late follows the placed build
    assert cp.session(1, "s-late", "app:00", 12.0, pick) == [Route(1, "A")]


def test_solve_with_unknown_session_falls_back_to_client_when_authority_is_an_ip() -> None:
    cp = conn(authority="127.0.0.1:1234", client="CN=runner-7")
    pick = FakePicker("A")
    cp.solve(3, solve("r1", "never"), 0.0, pick)
    cp.expire(5.0, pick, no_owner)
    assert pick.calls == [("client:CN=runner-7", False, "r1", None)]


def test_solve_with_no_key_at_all_picks_with_none() -> None:
    cp = conn(authority="[::1]:1234", client=None)
    pick = FakePicker("A")
    cp.solve(3, solve("r1", "s"), 0.0, pick)
    cp.expire(1.0, pick, no_owner)
    assert pick.calls == [(None, False, "r1", None)]


def test_session_arriving_in_time_gives_the_context_key() -> None:
    cp = conn(authority="gw.example:1234")
    pick = FakePicker("A")
    assert cp.solve(3, solve("r1", "s1"), 0.0, pick) == []
    d = cp.session(1, "s1", "/home/ci/repo:0a1b2c3d4e5f6071", 0.3, pick)
    assert routes(d) == {3: "A", 1: "A"}
    assert pick.calls == [("ctx:/home/ci/repo", False, "r1", None)]


def test_session_with_empty_sharedkey_uses_fallback_at_once() -> None:
    cp = conn(authority="gw.example:1234")
    pick = FakePicker("A")
    cp.session(1, "s1", "", 0.0, pick)  # buildctl: no sharedkey
    d = cp.solve(3, solve("r1", "s1"), 0.0, pick)
    assert routes(d) == {3: "A", 1: "A"}
    assert pick.calls == [("host:gw.example", False, "r1", None)]


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
    # only the first is picked by key; the second is picked for the bound replica
    assert pick.calls == [("ctx:one", False, "r1", None), (None, False, "r2", "A")]


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


def test_held_ref_past_timeout_is_unlocated() -> None:
    # Changed with admission queueing: an orphan Status/LLB call is no longer picked by key
    # (that replica does not know the Ref either); the shell decides (Unlocated).
    cp = conn(authority="gw.example:1234")
    pick = FakePicker("K")
    cp.follower(5, "orphan", 0.0, no_owner)
    cp.follower(6, "orphan2", 1.0, no_owner)
    assert cp.deadline() == HOLD
    assert cp.expire(HOLD, pick, no_owner) == [Unlocated(5, "orphan")]
    assert cp.deadline() == 1.0 + HOLD
    assert cp.expire(1.0 + HOLD, pick, no_owner) == [Unlocated(6, "orphan2")]
    assert pick.calls == []
    assert cp.deadline() is None
    assert cp.waiting() == 0
    assert cp.bound is None


def test_held_session_waits_for_its_solve_however_long_it_takes() -> None:
    # Changed: a held Session never times out (routing it by a fallback key could split the
    # build); it costs nothing while held and is released by the Solve that names it.
    cp = conn(authority="gw.example:1234")
    pick = FakePicker("K")
    cp.session(7, "lonely", "/src/x:00ff", 1.0, pick)
    cp.session(8, "no-key", "", 1.0, pick)
    assert cp.deadline() is None
    assert cp.expire(1e9, pick, no_owner) == []
    assert cp.waiting() == 2
    assert pick.calls == []
    d = cp.solve(3, solve("r1", "lonely"), 1e9, pick)
    assert routes(d) == {3: "K", 7: "K", 8: "K"}  # the binding releases the other one too
    assert pick.calls == [("ctx:/src/x", False, "r1", None)]
    assert cp.waiting() == 0


def test_held_session_is_released_by_an_internal_solve_naming_it_without_binding() -> None:
    cp = conn()
    pick = FakePicker("P")
    cp.session(1, "ps", "", 0.0, pick)
    cp.session(2, "other", "", 0.0, pick)
    d = cp.solve(3, solve("probe", "ps", internal=True), 100.0, pick)
    assert routes(d) == {3: "P", 1: "P"}
    assert cp.bound is None
    assert cp.waiting() == 1
    cp.forget(2, 200.0)
    assert cp.waiting() == 0


def test_other_calls_pick_as_internal_without_a_key() -> None:
    cp = conn(authority="gw.example")
    pick = FakePicker("A")
    assert cp.other(3, pick) == [Route(3, "A")]
    assert pick.calls == [(None, True, "", None)]  # internal picks are two random choices
    assert failed(cp.other(5, FakePicker(None))) == {5: NOREP}
    assert failed(cp.other(7, FakePicker(WAIT))) == {7: NOREP}  # a lookup does not queue
    assert cp.bound is None


def test_other_calls_follow_the_last_history_call_then_the_binding() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.history_replica = "H"
    assert cp.other(3, pick) == [Route(3, "H")]
    assert pick.calls == []
    cp.history_replica = None
    cp.session(1, "s", "k:0", 0.0, pick)
    cp.solve(5, solve("r", "s"), 0.0, pick)
    assert cp.other(7, pick) == [Route(7, "A")]
    cp.history_replica = "H"  # the history call wins over the binding
    assert cp.other(9, pick) == [Route(9, "H")]


# ---- no replica ------------------------------------------------------------------------------


def test_no_replica_fails_the_solve_and_its_held_followers_only() -> None:
    cp = conn()
    pick = FakePicker(None)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.session(2, "shared", "a:0", 0.0, pick)
    cp.follower(5, "r1", 0.0, no_owner)
    cp.follower(7, "other-ref", 0.0, no_owner)
    d = cp.solve(3, solve("r1", "s1", shared=("shared",)), 0.0, pick)
    assert failed(d) == {3: NOREP, 1: NOREP, 2: NOREP, 5: NOREP}
    assert len(d) == 4
    assert len({id(f.error) for f in d}) == 1  # one error for the whole build
    assert cp.bound is None
    assert cp.waiting() == 1  # stream 7 still waits for its own Solve


def test_no_replica_for_internal_probe() -> None:
    cp = conn()
    cp.follower(5, "probe", 0.0, no_owner)
    d = cp.solve(3, solve("probe", "ps", internal=True), 0.0, FakePicker(None))
    assert failed(d) == {3: NOREP, 5: NOREP}
    assert len(d) == 2


def test_failed_pending_solve_lets_the_next_one_bind() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: None if r == "r1" else "B")
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.solve(5, solve("r2", "s2"), 0.0, pick)
    cp.session(7, "s2", "b:0", 0.0, pick)
    d = cp.session(9, "s1", "a:0", 0.0, pick)
    assert failed(d) == {3: NOREP, 9: NOREP}
    assert routes(d) == {5: "B", 7: "B"}
    assert cp.bound == "B"


def test_bound_replica_gone_fails_the_solve_naming_the_replica() -> None:
    cp = conn()
    gone: set[str] = set()
    pick = FakePicker("A", on_target=lambda t, i, r: None if t in gone else t)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    gone.add("A")
    cp.follower(5, "r2", 1.0, no_owner)  # routed to the binding at once
    assert cp.session(7, "s2", "b:0", 1.0, pick) == [Route(7, "A")]
    d = cp.solve(9, solve("r2", "s2"), 1.0, pick)
    assert len(d) == 1
    assert isinstance(d[0], Fail) and d[0].stream == 9
    assert isinstance(d[0].error, errors.NoReplica)
    assert "A" in d[0].error.message
    assert d[0].error.message != NO_REPLICA
    assert cp.bound == "A"  # the connection stays bound
    assert cp.waiting() == 0


# ---- forget and deadline -----------------------------------------------------------------------


def test_forget_removes_a_held_stream() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.follower(5, "r1", 0.0, no_owner)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.forget(5, 0.0)
    assert cp.waiting() == 1
    d = cp.solve(3, solve("r1", "s1"), 0.0, pick)
    assert 5 not in routes(d)
    assert routes(d) == {3: "A", 1: "A"}


def test_forget_removes_a_pending_solve() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.solve(5, solve("r2", "s2"), 0.5, pick)
    cp.forget(3, 0.5)
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
    cp.forget(3, 4.6)
    assert cp.deadline() == 3.0 + HOLD


def test_held_streams_named_by_a_pending_solve_have_no_deadline() -> None:
    cp = conn()
    pick = FakePicker("A")
    cp.follower(5, "r1", 0.0, no_owner)
    cp.session(7, "shared", "x:0", 0.0, pick)
    assert cp.deadline() == HOLD  # the Status only: a session has no deadline
    cp.solve(3, solve("r1", "s1", shared=("shared",)), 4.0, pick)  # claims both
    assert cp.deadline() == 4.0 + SESSION_WAIT
    cp.follower(9, "r1", 4.5, no_owner)  # arrives after the Solve: held, no deadline
    assert cp.follower(11, "r-other", 4.5, no_owner) == []
    assert cp.deadline() == 4.0 + SESSION_WAIT
    cp.forget(3, 4.8)
    assert cp.deadline() == 4.5 + HOLD  # 11 kept its deadline; 5 and 9 start again at 4.8
    d = cp.expire(4.5 + HOLD, pick, no_owner)
    assert d == [Unlocated(11, "r-other")]
    d = cp.expire(4.8 + HOLD, pick, no_owner)
    assert d == [Unlocated(5, "r1"), Unlocated(9, "r1")]
    assert cp.deadline() is None
    assert cp.waiting() == 1  # the session still waits for a Solve that names it
    assert pick.calls == []


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


# ---- admission queueing ----------------------------------------------------------------------


def test_solve_without_a_free_slot_is_enqueued_and_its_held_followers_wait() -> None:
    cp = conn()
    pick = FakePicker(WAIT)
    assert cp.session(1, "s1", "/src/app:0a1b2c3d4e5f6071", 0.0, pick) == []
    assert cp.follower(5, "ref1", 0.0, no_owner) == []  # Status
    assert cp.follower(7, "ref1", 0.0, no_owner) == []  # LLBBridge
    assert cp.follower(9, "ref-later", 0.0, no_owner) == []  # another build's Status
    d = cp.solve(3, solve("ref1", "s1"), 0.1, pick)
    assert d == [Enqueue(3, "ref1", False, "ctx:/src/app", None), Waiting(5, "ref1"),
                 Waiting(7, "ref1")]
    assert pick.calls == [("ctx:/src/app", False, "ref1", None)]
    assert cp.bound is None
    assert cp.queued_streams() == [3]
    assert cp.waiting() == 5
    assert cp.deadline() == HOLD  # only stream 9: the queued build's streams have no deadline
    assert cp.expire(1000.0, pick, no_owner) == [Unlocated(9, "ref-later")]
    assert cp.deadline() is None
    assert cp.waiting() == 4


def test_status_after_the_solve_was_queued_waits_without_deadline() -> None:
    cp = conn()
    pick = FakePicker(WAIT)
    cp.session(1, "s1", "a:0", 0.0, pick)
    assert cp.solve(3, solve("ref1", "s1"), 0.0, pick) == [
        Enqueue(3, "ref1", False, "ctx:a", None)]
    assert cp.follower(5, "ref1", 1.0, no_owner) == [Waiting(5, "ref1")]
    # the ledger may know the Ref from elsewhere: the queued build here still wins
    assert cp.follower(7, "ref1", 1.0, {"ref1": "X"}.get) == [Waiting(7, "ref1")]
    assert cp.deadline() is None
    assert cp.expire(1000.0, pick, no_owner) == []
    assert cp.waiting() == 4
    d = cp.admitted(3, "B", Outcome.PRIMARY, 1001.0, pick)
    assert routes(d) == {3: "B", 1: "B", 5: "B", 7: "B"}


def test_admitted_binds_places_the_build_and_decides_later_solves() -> None:
    cp = conn()
    busy = {"r3"}
    pick = FakePicker(WAIT, on_target=lambda t, i, r: WAIT if r in busy else t)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.follower(5, "r1", 0.0, no_owner)
    cp.follower(6, "r1", 0.0, no_owner)
    assert cp.solve(3, solve("r1", "s1"), 0.0, pick) == [
        Enqueue(3, "r1", False, "ctx:a", None), Waiting(5, "r1"), Waiting(6, "r1")]
    # later non-internal Solves of the connection stay pending behind the binding one
    assert cp.solve(11, solve("r2", "s2"), 0.1, pick) == []
    assert cp.session(9, "s2", "b:0", 0.1, pick) == []
    assert cp.solve(13, solve("r3", "s3"), 0.2, pick) == []
    assert cp.follower(15, "r3", 0.2, no_owner) == []  # its Solve is not queued: no Waiting
    assert len(pick.calls) == 1
    assert cp.deadline() is None
    assert cp.expire(50.0, pick, no_owner) == []
    assert len(pick.calls) == 1
    d = cp.admitted(3, "B", Outcome.SPILL, 60.0, pick)
    assert d[:2] == [Placed(3, "B", "r1", False, Outcome.SPILL), Route(3, "B")]
    assert cp.bound == "B"
    assert routes(d) == {3: "B", 1: "B", 5: "B", 6: "B", 9: "B", 11: "B", 15: "B"}
    assert Placed(11, "B", "r2", False, Outcome.BOUND) in d
    assert d[-1] == Enqueue(13, "r3", False, None, "B")
    assert pick.calls[1:] == [(None, False, "r2", "B"), (None, False, "r3", "B")]
    assert cp.queued_streams() == [13]
    # a Status of the build waiting for the bound replica waits too
    assert cp.follower(17, "r3", 61.0, no_owner) == [Waiting(17, "r3")]
    assert cp.deadline() is None
    d = cp.admitted(13, "B", Outcome.BOUND, 62.0, pick)
    assert d == [Placed(13, "B", "r3", False, Outcome.BOUND), Route(13, "B"), Route(17, "B")]
    assert cp.waiting() == 0
    assert cp.queued_streams() == []


def test_solve_of_a_bound_connection_waits_for_the_bound_replica() -> None:
    cp = conn()
    pick = FakePicker("A", on_target=lambda t, i, r: WAIT)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    assert cp.bound == "A"
    assert cp.session(5, "s2", "b:0", 1.0, pick) == [Route(5, "A")]
    assert cp.solve(7, solve("r2", "s2"), 1.0, pick) == [Enqueue(7, "r2", False, None, "A")]
    assert cp.follower(9, "r2", 1.1, no_owner) == [Waiting(9, "r2")]
    # a probe of a bound connection waits for the bound replica as well
    assert cp.solve(11, solve("probe", "ps", internal=True), 1.2, pick) == [
        Enqueue(11, "probe", True, None, "A")]
    assert cp.queued_streams() == [7, 11]
    assert cp.waiting() == 3
    assert cp.admitted(11, "A", Outcome.BOUND, 2.0, pick) == [
        Placed(11, "A", "probe", True, Outcome.BOUND), Route(11, "A")]
    err = errors.QueueTimeout("waited too long")
    d = cp.reject(7, err, 3.0, pick)
    assert [(f.stream, f.error) for f in d if isinstance(f, Fail)] == [(7, err), (9, err)]
    assert len(d) == 2
    assert cp.bound == "A"
    assert cp.waiting() == 0


def test_reject_fails_the_build_and_lets_the_next_solve_bind() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: WAIT if r == "r1" else "C")
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.session(2, "shared", "a:0", 0.0, pick)
    cp.session(4, "shared2", "a:0", 0.0, pick)
    cp.follower(5, "r1", 0.0, no_owner)
    cp.follower(6, "r-unrelated", 0.0, no_owner)
    cp.solve(3, solve("r1", "s1", shared=("shared", "shared2")), 0.0, pick)
    cp.solve(11, solve("r2", "s2", shared=("shared2",)), 0.1, pick)
    cp.session(9, "s2", "b:0", 0.1, pick)
    err = errors.QueueFull("too many builds waiting")
    d = cp.reject(3, err, 0.5, pick)
    fails = [f for f in d if isinstance(f, Fail)]
    assert {f.stream for f in fails} == {3, 1, 2, 5}  # shared2 is named by Solve 11 too
    assert all(f.error is err for f in fails)
    assert fails[0].stream == 3
    assert Placed(11, "C", "r2", False, Outcome.PRIMARY) in d
    assert routes(d) == {11: "C", 9: "C", 4: "C", 6: "C"}
    assert pick.calls[-1] == ("ctx:b", False, "r2", None)
    assert cp.bound == "C"
    assert cp.waiting() == 0
    # an answer for a Solve that is no longer queued is ignored
    assert cp.reject(3, err, 0.6, pick) == []
    assert cp.admitted(3, "C", Outcome.PRIMARY, 0.6, pick) == []


def test_reject_of_the_binding_solve_waits_for_the_next_solves_session() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: WAIT if r == "r1" else "C")
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.solve(11, solve("r2", "s2"), 0.2, pick)
    assert cp.deadline() is None  # pending behind the queued Solve: no session wait yet
    assert failed(cp.reject(3, errors.QueueTimeout("t"), 0.5, pick)).keys() == {3, 1}
    assert cp.deadline() == 0.2 + SESSION_WAIT
    d = cp.session(9, "s2", "late:0", 0.6, pick)
    assert routes(d) == {11: "C", 9: "C"}
    assert pick.calls[-1] == ("ctx:late", False, "r2", None)


def test_admitted_then_bound_replica_gone_fails_later_solves_naming_it() -> None:
    cp = conn()
    pick = FakePicker(WAIT, on_target=lambda t, i, r: None)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.solve(5, solve("r2", "s2"), 0.0, pick)
    cp.follower(7, "r2", 0.0, no_owner)
    d = cp.admitted(3, "B", Outcome.PRIMARY, 1.0, pick)
    assert routes(d) == {3: "B", 1: "B", 7: "B"}  # the binding released every held stream
    fails = [f for f in d if isinstance(f, Fail)]
    assert [f.stream for f in fails] == [5]
    assert isinstance(fails[0].error, errors.NoReplica)
    assert "B" in fails[0].error.message
    assert cp.waiting() == 0


def test_forget_a_queued_solve() -> None:
    cp = conn()
    pick = FakePicker(WAIT)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.follower(5, "r1", 0.0, no_owner)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    assert cp.deadline() is None
    cp.forget(3, 2.0)
    assert cp.queued_streams() == []
    assert cp.waiting() == 2
    assert cp.deadline() == 2.0 + HOLD  # the held Status waits for its own deadline again
    assert cp.admitted(3, "A", Outcome.PRIMARY, 2.5, pick) == []  # stale answer: ignored
    assert cp.bound is None
    assert cp.expire(2.0 + HOLD, FakePicker("K"), no_owner) == [Unlocated(5, "r1")]
    assert cp.waiting() == 1  # the session waits on (sessions never time out)
    # the connection is not stuck: the next Solve is decided (and may bind)
    assert cp.session(8, "s2", "b:0", 10.0, pick) == []
    d = cp.solve(9, solve("r2", "s2"), 10.0, FakePicker("A"))
    assert routes(d) == {9: "A", 8: "A", 1: "A"}
    assert cp.bound == "A"


def test_forget_of_the_queued_binding_solve_lets_the_next_solve_be_decided() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: WAIT if r == "r1" else "A")
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.session(9, "s2", "b:0", 0.1, pick)
    cp.solve(11, solve("r2", "s2"), 0.1, pick)
    cp.forget(3, 0.2)
    when = cp.deadline()
    assert when is not None
    d = cp.expire(max(when, 0.2), pick, no_owner)
    assert routes(d) == {11: "A", 9: "A", 1: "A"}
    assert pick.calls[-1] == ("ctx:b", False, "r2", None)


def test_forget_of_the_queued_binding_solve_does_not_delay_the_next_solve() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: WAIT if r == "r1" else "A")
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.session(9, "s2", "b:0", 0.1, pick)
    cp.solve(11, solve("r2", "s2"), 0.1, pick)
    cp.forget(3, 0.2)
    when = cp.deadline()
    assert when is not None and when <= 0.2


def test_forgotten_queued_solve_leaves_its_status_to_the_binding_or_the_ledger() -> None:
    cp = conn()
    pick = FakePicker("A", on_target=lambda t, i, r: WAIT)
    cp.session(1, "s1", "a:0", 0.0, pick)
    cp.solve(3, solve("r1", "s1"), 0.0, pick)
    cp.solve(5, solve("r2", "s2"), 1.0, pick)
    cp.solve(6, solve("r3", "s3"), 1.0, pick)
    assert cp.follower(7, "r2", 1.0, no_owner) == [Waiting(7, "r2")]
    assert cp.follower(8, "r3", 1.0, no_owner) == [Waiting(8, "r3")]
    cp.forget(5, 2.0)
    cp.forget(6, 2.0)
    assert cp.deadline() == 2.0 + HOLD
    located = {"r3": "L"}
    assert cp.expire(2.0 + HOLD, pick, located.get) == [Route(7, "A"), Route(8, "L")]


def test_internal_solve_without_a_slot_is_enqueued_as_internal_and_does_not_bind() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: WAIT if i else "R")
    cp.session(1, "probe-s", "", 0.0, pick)
    cp.follower(5, "probe", 0.0, no_owner)
    d = cp.solve(3, solve("probe", "probe-s", internal=True), 0.0, pick)
    assert d == [Enqueue(3, "probe", True, None, None), Waiting(5, "probe")]
    assert pick.calls == [(None, True, "probe", None)]
    assert cp.queued_streams() == [3]
    assert cp.deadline() is None
    d = cp.admitted(3, "P", Outcome.RANDOM, 1.0, pick)
    assert d == [Placed(3, "P", "probe", True, Outcome.RANDOM), Route(3, "P"), Route(1, "P"),
                 Route(5, "P")]
    assert cp.bound is None
    # the real build is still picked by its own key and binds
    cp.session(7, "s", "/w/app:00", 2.0, pick)
    d = cp.solve(9, solve("r", "s"), 2.0, pick)
    assert routes(d) == {9: "R", 7: "R"}
    assert pick.calls[-1] == ("ctx:/w/app", False, "r", None)
    assert cp.bound == "R"


def test_queued_internal_solve_does_not_hold_back_the_binding_solve() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: WAIT if i else "R")
    cp.solve(3, solve("probe", "", internal=True), 0.0, pick)
    cp.session(7, "s", "a:0", 0.0, pick)
    d = cp.solve(9, solve("r", "s"), 0.0, pick)
    assert routes(d) == {9: "R", 7: "R"}
    assert cp.bound == "R"
    # rejecting the queued probe fails it alone; the binding stays
    err = errors.QueueTimeout("t")
    assert cp.reject(3, err, 1.0, pick) == [Fail(3, err)]
    assert cp.bound == "R"
    assert cp.waiting() == 0


def test_binding_does_not_steal_the_held_streams_of_a_queued_internal_build() -> None:
    cp = conn()
    pick = FakePicker(lambda k, i, r: WAIT if i else "R")
    cp.session(1, "probe-s", "", 0.0, pick)
    cp.follower(5, "probe", 0.0, no_owner)
    cp.solve(3, solve("probe", "probe-s", internal=True), 0.0, pick)  # queued
    cp.session(7, "s", "a:0", 0.0, pick)
    d = cp.solve(9, solve("r", "s"), 0.0, pick)  # binds to R
    d += cp.admitted(3, "P", Outcome.RANDOM, 1.0, pick)
    assert routes(d) == {9: "R", 7: "R", 3: "P", 1: "P", 5: "P"}


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


def _feed(cp: ConnectionPlacement, kind: str, sid: int, b: _Build, now: float,
          pick: Callable[..., Pick]) -> list:
    if kind == "session":
        return cp.session(sid, b.session, b.sharedkey, now, pick)
    if kind == "shared":
        return cp.session(sid, "shared", b.sharedkey, now, pick)
    if kind == "solve":
        return cp.solve(sid, SolveInfo(b.ref, b.session, b.internal, b.shared), now, pick)
    return cp.follower(sid, b.ref, now, no_owner)


def _builds(n_builds: int, probe: bool, with_shared: bool) -> list[_Build]:
    builds = [_Build(f"ref{i}", f"sess{i}", f"/src/d{i}:{i:016x}", False,
                     ("shared",) if with_shared else ()) for i in range(n_builds)]
    if probe:
        builds.insert(0, _Build("probe", "probe-sess", "", True, ()))
    return builds


def _arrivals(data: st.DataObject, builds: list[_Build]
              ) -> tuple[list[tuple[str, int, _Build]], list[float]]:
    """The builds' calls in any order, each a few ms after the one before."""
    events = data.draw(st.permutations(_events(builds)), label="order")
    gaps = data.draw(st.lists(st.floats(0, 0.05), min_size=len(events),
                              max_size=len(events)), label="gaps")
    return events, gaps


def _ctx(b: _Build) -> str:
    return "ctx:" + b.sharedkey.rsplit(":", 1)[0]


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
    builds = _builds(n_builds, probe, with_shared)
    events, gaps = _arrivals(data, builds)
    pick = FakePicker(lambda k, i, r: "P" if i else f"R{zlib.crc32((k or '').encode()) % 3}")
    cp = conn()
    decisions: list = []
    kinds: dict[int, tuple[str, _Build]] = {}
    now = 0.0
    for sid, ((kind, _, b), gap) in enumerate(zip(events, gaps, strict=True), start=1):
        now += gap
        kinds[sid] = (kind, b)
        decisions += _feed(cp, kind, sid, b, now, pick)
        decisions += cp.expire(now, pick, no_owner)
    # Every Solve and Session arrived within session_wait: nothing may still wait.
    assert cp.waiting() == 0
    assert cp.deadline() is None
    assert cp.expire(now + 100, pick, no_owner) == []

    counted = Counter(d.stream for d in decisions if isinstance(d, Route | Fail | Unlocated))
    assert counted == Counter(kinds.keys())  # every stream exactly once
    assert not any(isinstance(d, Fail | Unlocated | Enqueue | Waiting) for d in decisions)
    placed = {d.ref: d for d in decisions if isinstance(d, Placed)}
    assert len(placed) == len(builds)
    assert len([d for d in decisions if isinstance(d, Placed)]) == len(builds)
    where = routes(decisions)
    for sid, (kind, b) in kinds.items():
        if kind == "shared":
            assert where[sid] == cp.bound
        else:
            assert where[sid] == placed[b.ref].replica, (kind, b.ref)
    # real builds all on the bound replica; one non-internal pick by key, the others for it
    real = [b for b in builds if not b.internal]
    assert {placed[b.ref].replica for b in real} == {cp.bound}
    by_key = [c for c in pick.calls if not c[1] and c[3] is None]
    assert len(by_key) == 1
    first_key, _, first_ref, _ = by_key[0]
    first = next(b for b in real if b.ref == first_ref)
    assert first_key == _ctx(first)
    assert placed[first_ref].outcome is Outcome.PRIMARY
    assert all(placed[b.ref].outcome is Outcome.BOUND for b in real if b.ref != first_ref)
    targeted = sorted(c[2] for c in pick.calls if c[3] is not None)
    assert all(c[3] == cp.bound for c in pick.calls if c[3] is not None)
    assert targeted == sorted([b.ref for b in real if b.ref != first_ref] + (
        ["probe"] if probe and placed["probe"].outcome is Outcome.BOUND else []))


@settings(max_examples=200, deadline=None)
@given(
    n_builds=st.integers(1, 4),
    probe=st.booleans(),
    with_shared=st.booleans(),
    data=st.data(),
)
def test_with_admission_queueing_every_stream_gets_one_final_decision(
    n_builds: int, probe: bool, with_shared: bool, data: st.DataObject
) -> None:
    """A picker that randomly has no slot (or lost the bound replica), and an admission queue
    that admits or rejects the queued Solves in random order."""
    builds = _builds(n_builds, probe, with_shared)
    by_ref = {b.ref: b for b in builds}
    events, gaps = _arrivals(data, builds)
    cp = conn()
    queued: dict[int, Enqueue] = {}  # the admission queue, as the shell would hold it
    kinds: dict[int, tuple[str, _Build]] = {}
    solve_of: dict[str, int] = {}
    rejected: dict[int, errors.GatewayError] = {}
    waited: Counter[int] = Counter()
    decisions: list = []

    def pick(key: str | None, *, internal: bool, ref: str, target: str | None = None) -> Pick:
        if target is not None:
            assert target == cp.bound
            slot = data.draw(st.sampled_from(["free", "free", "busy", "busy", "gone"]),
                             label="bound replica")
            event("bound replica " + slot)
            return {"free": (target, Outcome.BOUND), "busy": WAIT, "gone": None}[slot]
        if internal:  # probes and lookups never wait here
            return "P", Outcome.RANDOM
        assert cp.bound is None  # a bound connection picks for its replica only
        assert not any(not e.internal and e.target is None for e in queued.values())
        assert key == _ctx(by_ref[ref])  # every session arrives within session_wait
        if data.draw(st.sampled_from([True, True, False]), label="no free slot"):
            return WAIT
        return f"R{zlib.crc32(key.encode()) % 3}", Outcome.PRIMARY

    def apply(ds: list) -> None:
        for d in ds:
            if isinstance(d, Enqueue):
                b = by_ref[d.ref]
                assert d.stream == solve_of[d.ref] and d.stream not in queued
                assert d.internal == b.internal
                assert d.target == cp.bound
                assert d.key == (None if d.target else _ctx(b))
                queued[d.stream] = d
            elif isinstance(d, Waiting):
                kind, b = kinds[d.stream]
                assert kind in ("status", "llb") and d.ref == b.ref
                assert solve_of[b.ref] in queued
                waited[d.stream] += 1
                event("Waiting")
            decisions.append(d)
        assert sorted(cp.queued_streams()) == sorted(queued)

    def admission() -> None:
        stream = data.draw(st.sampled_from(sorted(queued)), label="queued Solve")
        entry = queued.pop(stream)
        if data.draw(st.booleans(), label="admit"):
            event("admitted " + ("for the bound replica" if entry.target else "binding"))
            replica = entry.target or data.draw(st.sampled_from(["R0", "R1", "R2"]))
            outcome = Outcome.BOUND if entry.target else Outcome.SPILL
            apply(cp.admitted(stream, replica, outcome, now, pick))
        else:
            event("rejected")
            rejected[stream] = errors.QueueTimeout(f"Solve {stream} waited too long")
            apply(cp.reject(stream, rejected[stream], now, pick))

    now = 0.0
    for sid, ((kind, _, b), gap) in enumerate(zip(events, gaps, strict=True), start=1):
        now += gap
        kinds[sid] = (kind, b)
        if kind == "solve":
            solve_of[b.ref] = sid
        its_solve_queued = kind in ("status", "llb") and solve_of.get(b.ref) in queued
        got = _feed(cp, kind, sid, b, now, pick)
        if its_solve_queued:
            assert got == [Waiting(sid, b.ref)]
        apply(got)
        apply(cp.expire(now, pick, no_owner))
        while queued and data.draw(st.booleans(), label="admission runs"):
            admission()
    while queued:
        admission()
    apply(cp.expire(now + 100, pick, no_owner))
    assert not queued
    assert cp.deadline() is None

    # every stream exactly one final decision, but a Session that came after its build failed
    # on a connection that never bound: it waits for a Solve naming it until the client goes
    final = [d for d in decisions if isinstance(d, Route | Fail | Unlocated)]
    counted = Counter(d.stream for d in final)
    assert set(counted.values()) <= {1}
    undecided = set(kinds) - set(counted)
    assert cp.waiting() == len(undecided)
    if undecided:
        assert cp.bound is None
    for sid in undecided:
        kind, b = kinds[sid]
        assert kind in ("session", "shared")
        assert kind == "shared" or b.ref not in {d.ref for d in decisions if isinstance(d, Placed)}
        cp.forget(sid, now + 100)
    assert cp.waiting() == 0
    assert all(n == 1 for n in waited.values())
    for s in waited:
        assert decisions.index(next(d for d in final if d.stream == s)) > next(
            i for i, d in enumerate(decisions) if isinstance(d, Waiting) and d.stream == s)
    placed: dict[str, Placed] = {}
    for d in decisions:
        if isinstance(d, Placed):
            assert d.ref not in placed and d.stream == solve_of[d.ref]
            placed[d.ref] = d
    where = routes(decisions)
    fails = {d.stream: d.error for d in decisions if isinstance(d, Fail)}
    # a placed build is whole on its replica; a build not placed failed its Solve, and its
    # streams failed with the same error, or came later (routed elsewhere or Unlocated)
    for sid, (kind, b) in kinds.items():
        if kind == "shared":
            continue
        if b.ref in placed:
            assert where.get(sid) == placed[b.ref].replica, (kind, b.ref)
            continue
        solve_error = fails[solve_of[b.ref]]
        if sid in fails:
            assert fails[sid] is solve_error, (kind, b.ref)
        if kind == "solve":
            if sid in rejected:
                assert solve_error is rejected[sid]
            else:
                assert isinstance(solve_error, errors.NoReplica)
                assert cp.bound is not None and cp.bound in solve_error.message
    for d in decisions:
        if isinstance(d, Unlocated):
            event("Unlocated")
            kind, b = kinds[d.stream]
            assert kind in ("status", "llb") and b.ref not in placed
    # all real builds on the bound replica; only the binding one was not placed as BOUND
    real = [placed[b.ref] for b in builds if not b.internal and b.ref in placed]
    assert {p.replica for p in real} <= {cp.bound}
    assert [p.outcome is Outcome.BOUND for p in real].count(False) == (1 if real else 0)
    if real:
        first = next(d for d in decisions if isinstance(d, Placed) and not d.internal)
        assert first.outcome is not Outcome.BOUND
        shared = [s for s, (kind, _) in kinds.items() if kind == "shared" and s in where]
        assert all(where[s] == cp.bound for s in shared)
    if probe and "probe" in placed:
        assert placed["probe"].replica in ("P", cp.bound)


@settings(max_examples=60, deadline=None)
@given(n_builds=st.integers(1, 3), data=st.data())
def test_without_replicas_every_stream_fails_exactly_once(n_builds: int, data: st.DataObject
                                                          ) -> None:
    builds = [_Build(f"ref{i}", f"sess{i}", f"/d{i}:00", i == 0, ()) for i in range(n_builds)]
    events = data.draw(st.permutations(_events(builds)), label="order")
    pick = FakePicker(None)
    cp = conn()
    decisions: list = []
    kinds: dict[int, str] = {}
    for sid, (kind, _, b) in enumerate(events, start=1):
        kinds[sid] = kind
        decisions += _feed(cp, kind, sid, b, 0.0, pick)
    decisions += cp.expire(1000.0, pick, no_owner)
    counted = Counter(d.stream for d in decisions)
    assert set(counted.values()) == {1}
    for d in decisions:
        # a Status/LLB call after its build failed names a Ref nobody runs: the shell decides
        if isinstance(d, Unlocated):
            assert kinds[d.stream] in ("status", "llb")
        else:
            assert isinstance(d, Fail) and isinstance(d.error, errors.NoReplica)
            assert d.error.message == NO_REPLICA
    # a Session after its build failed waits (sessions never time out) until forgotten
    undecided = set(kinds) - set(counted)
    assert all(kinds[s] == "session" for s in undecided)
    assert cp.waiting() == len(undecided)
    assert cp.deadline() is None
    for s in undecided:
        cp.forget(s, 1000.0)
    assert cp.waiting() == 0

