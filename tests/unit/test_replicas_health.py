"""Passive ejection: exponential backoff, re-admission by a probe after it, streak reset."""

from __future__ import annotations

from gateway.replicas.health import Ejections


def test_backoff_doubles_with_each_ejection_in_a_row_up_to_the_cap() -> None:
    e = Ejections(base=1.0, cap=5.0)
    assert e.eject("r", 0.0) == 1.0
    assert not e.probe_ok("r", 0.5)  # still backing off
    assert e.probe_ok("r", 1.0)  # re-admitted
    assert e.eject("r", 10.0) == 12.0  # the streak goes on: 2 s
    assert e.probe_ok("r", 12.0)
    assert e.eject("r", 20.0) == 24.0
    assert e.probe_ok("r", 24.0)
    assert e.eject("r", 30.0) == 35.0  # capped


def test_a_healthy_probe_while_admitted_ends_the_streak() -> None:
    e = Ejections(base=1.0, cap=60.0)
    e.eject("r", 0.0)
    assert e.probe_ok("r", 1.0)  # re-admitted
    assert e.probe_ok("r", 6.0)  # healthy while admitted
    assert e.eject("r", 10.0) == 11.0  # back to the base


def test_replicas_are_independent_and_forget_clears() -> None:
    e = Ejections(base=2.0, cap=60.0)
    e.eject("a", 0.0)
    assert e.is_ejected("a") and not e.is_ejected("b")
    assert e.probe_ok("b", 0.0)
    e.forget("a")
    assert not e.is_ejected("a")
    assert e.eject("a", 0.0) == 2.0
