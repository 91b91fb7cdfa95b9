"""The scaling decision: demand to a replica count, the down window, victims and costs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ScalingSettings
from gateway.scaling.decision import (
    BUSY_COST,
    VICTIM_COST,
    Pod,
    Recommendations,
    decide,
    deletion_costs,
    highest_ordinals,
    ordinal,
    victims,
    wanted,
)

POLICY = ScalingSettings(min_replicas=0, max_replicas=3, target_builds=1, down_window=300.0)


def test_wanted_is_demand_over_target_clamped() -> None:
    policy = ScalingSettings(1, 5, 2, 60.0)
    assert wanted(policy, running=0, queued=0) == 1  # min
    assert wanted(policy, running=3, queued=0) == 2  # ceil(3 / 2)
    assert wanted(policy, running=4, queued=1) == 3
    assert wanted(policy, running=40, queued=9) == 5  # max


def test_a_burst_scales_up_at_once_and_not_past_max() -> None:
    d = decide(POLICY, Recommendations(), running=0, queued=6, busy=0, current=0, now=0.0)
    assert d.replicas == 3 and d.wanted == 3
    # the same burst seen again while its pods start: no more than already asked for
    again = decide(POLICY, d.recommendations, running=0, queued=6, busy=0, current=3, now=1.0)
    assert again.replicas == 3


def test_down_only_after_the_window_of_lower_demand() -> None:
    d = decide(POLICY, Recommendations(), running=3, queued=0, busy=3, current=3, now=0.0)
    d = decide(POLICY, d.recommendations, running=1, queued=0, busy=1, current=3, now=10.0)
    assert d.replicas == 3 and d.wanted == 1
    assert d.recheck_at == 300.0  # when the high recommendation leaves the window
    d = decide(POLICY, d.recommendations, running=1, queued=0, busy=1, current=3, now=299.0)
    assert d.replicas == 3
    d = decide(POLICY, d.recommendations, running=1, queued=0, busy=1, current=3, now=300.0)
    assert d.replicas == 1 and d.recheck_at is None


def test_a_short_rise_inside_the_window_restarts_it() -> None:
    d = decide(POLICY, Recommendations(), running=2, queued=0, busy=2, current=2, now=0.0)
    d = decide(POLICY, d.recommendations, running=0, queued=0, busy=0, current=2, now=100.0)
    d = decide(POLICY, d.recommendations, running=2, queued=0, busy=2, current=2, now=200.0)
    d = decide(POLICY, d.recommendations, running=0, queued=0, busy=0, current=2, now=450.0)
    assert d.replicas == 2  # the rise at 200 still counts until 500
    d = decide(POLICY, d.recommendations, running=0, queued=0, busy=0, current=2, now=500.0)
    assert d.replicas == 0


def test_the_first_decision_counts_the_current_count_for_a_window() -> None:
    """A gateway that starts beside three idle replicas does not remove them at once."""
    d = decide(POLICY, Recommendations(), running=0, queued=0, busy=0, current=3, now=0.0)
    assert d.replicas == 3 and d.recheck_at == 300.0
    d = decide(POLICY, d.recommendations, running=0, queued=0, busy=0, current=3, now=300.0)
    assert d.replicas == 0


def test_never_below_the_busy_replicas() -> None:
    d = decide(POLICY, Recommendations(), running=1, queued=0, busy=2, current=3, now=0.0)
    d = decide(POLICY, d.recommendations, running=1, queued=0, busy=2, current=3, now=1000.0)
    assert d.replicas == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 50), st.integers(0, 8), st.integers(0, 8)),
                min_size=1, max_size=30))
def test_the_count_is_the_highest_recommendation_of_the_window(
        steps: list[tuple[float, int, int]]) -> None:
    """Against a model that keeps every recommendation: up at once, down to the window's max."""
    policy = ScalingSettings(0, 5, 2, 60.0)
    history: list[tuple[float, int]] = [(0.0, 0)]  # the first decision's seed: current
    recs = Recommendations()
    now, current = 0.0, 0
    for dt, running, queued in steps:
        now += dt
        want = wanted(policy, running=running, queued=queued)
        history.append((now, want))
        window_max = max(n for t, n in history if t > now - 60.0)
        expected = want if want >= current else min(current, window_max)
        d = decide(policy, recs, running=running, queued=queued, busy=0, current=current,
                   now=now)
        assert d.replicas == expected
        assert len(d.recommendations.points) <= policy.max_replicas + 1
        recs, current = d.recommendations, d.replicas


def pod(name: str, *, ready: bool = True, busy: bool = False, terminating: bool = False,
        created: str = "2026-12-07T00:00:00Z") -> Pod:
    return Pod(name, ready, terminating, created, busy)


def test_victims_are_idle_unready_first_then_newest() -> None:
    pods = [pod("a", created="2026-12-07T00:00:01Z"), pod("b", created="2026-12-07T00:00:03Z"),
            pod("c", busy=True, created="2026-12-07T00:00:05Z"),
            pod("d", ready=False, created="2026-12-07T00:00:00Z"),
            pod("e", terminating=True)]
    assert victims(pods, 4) == ()  # e is leaving already: four stay
    assert victims(pods, 3) == ("d",)
    assert victims(pods, 2) == ("d", "b")
    assert victims(pods, 1) == ("d", "b", "a")
    assert victims(pods, 0) == ("d", "b", "a")  # c is busy: never a victim
    # pods already draining stay the victims, rather than draining others in their place
    assert victims(pods, 3, prefer={"a"}) == ("a",)
    assert victims(pods, 3, prefer={"c"}) == ("d",)  # a busy one is never kept as a victim


def test_costs_are_low_on_victims_and_high_on_busy_pods() -> None:
    pods = [pod("a"), pod("b", busy=True), pod("c"), pod("d", busy=True, terminating=True)]
    assert deletion_costs(pods, ["a"]) == {"a": VICTIM_COST, "b": BUSY_COST}


def test_a_statefulset_drains_its_highest_ordinals_and_drops_only_below_busy_ones() -> None:
    pods = [pod(f"b-{i}", busy=i == 1) for i in range(4)]
    # down to 1: ordinals 3, 2, 1 drain; 3 and 2 are idle and go, 1 holds the count at 2
    assert highest_ordinals(pods, 1) == (("b-3", "b-2", "b-1"), 2)
    idle = [pod(f"b-{i}") for i in range(4)]
    assert highest_ordinals(idle, 1) == (("b-3", "b-2", "b-1"), 1)
    top_busy = [pod(f"b-{i}", busy=i == 3) for i in range(4)]
    assert highest_ordinals(top_busy, 2) == (("b-3", "b-2"), 4)  # nothing may go yet
    leaving = [*idle[:3], pod("b-3", terminating=True), pod("other")]
    assert highest_ordinals(leaving, 3) == ((), 3)
    assert ordinal("buildkitd-12") == 12 and ordinal("buildkitd") is None
