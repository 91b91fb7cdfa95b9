"""gateway/routing/key.py: the placement key and its fallbacks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing.key import authority_name, context_part, placement_key


@pytest.mark.parametrize(
    ("sharedkey", "part"),
    [
        ("myapp:0a1b2c3d4e5f6071", "myapp"),
        ("/src/app:0a1b2c3d4e5f6071", "/src/app"),
        ("C:\\src\\app:deadbeefdeadbeef", "C:\\src\\app"),  # only the last ':' separates
        ("a:b:c", "a:b"),
        ("nocolon", "nocolon"),
        (":onlynode", ""),
        ("dir:", "dir"),
        ("", ""),
    ],
)
def test_context_part(sharedkey: str, part: str) -> None:
    assert context_part(sharedkey) == part


@settings(max_examples=100, deadline=None)
@given(directory=st.text(max_size=30), node=st.text(alphabet="0123456789abcdef", max_size=16))
def test_context_part_drops_the_node_id(directory: str, node: str) -> None:
    assert context_part(f"{directory}:{node}") == directory


@pytest.mark.parametrize(
    ("authority", "name"),
    [
        ("gateway.ci.svc:1234", "gateway.ci.svc"),
        ("Gateway.Example.COM:443", "gateway.example.com"),
        ("buildkit", "buildkit"),
        ("buildkit:1234", "buildkit"),
        ("10.0.0.1:1234", None),
        ("10.0.0.1", None),
        ("localhost:1234", None),
        ("localhost", None),
        ("[::1]:1234", None),
        ("[2001:db8::1]:443", None),
        ("::1", None),
        ("2001:db8::1", None),
        ("fe80::1%eth0", None),
        ("", None),
        (":1234", None),
    ],
)
def test_authority_name(authority: str, name: str | None) -> None:
    assert authority_name(authority) == name


@pytest.mark.parametrize("authority", ["LOCALHOST:1234", "Localhost"])
def test_authority_localhost_any_case(authority: str) -> None:
    assert authority_name(authority) is None


def test_placement_key_prefers_sharedkey_context() -> None:
    assert placement_key(sharedkey="/src/app:abcdef0123456789", authority="gw.example:1234",
                         client="10.1.1.1") == "ctx:/src/app"


def test_placement_key_falls_back_to_authority_name() -> None:
    for sharedkey in ("", ":abcdef0123456789"):
        assert placement_key(sharedkey=sharedkey, authority="GW.example:1234",
                             client="10.1.1.1") == "host:gw.example"


def test_placement_key_falls_back_to_client_when_authority_is_an_address() -> None:
    for authority in ("10.0.0.5:1234", "localhost:1234", "[::1]:1234", ""):
        assert placement_key(sharedkey="", authority=authority,
                             client="CN=ci-runner") == "client:CN=ci-runner"


def test_placement_key_none_when_nothing_known() -> None:
    assert placement_key(sharedkey="", authority="127.0.0.1:1234", client=None) is None
    assert placement_key(sharedkey="", authority="", client="") is None


def test_keys_of_different_sources_never_collide() -> None:
    a = placement_key(sharedkey="build:00", authority="", client=None)
    b = placement_key(sharedkey="", authority="build", client=None)
    c = placement_key(sharedkey="", authority="", client="build")
    assert len({a, b, c}) == 3
