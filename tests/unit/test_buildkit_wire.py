"""gateway/buildkit/wire.py: SolveRequest decoding, gRPC message framing, call classes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.buildkit import wire
from gateway.buildkit.wire import CallClass, DecodeError, SolveInfo
from gateway.pb import control_pb2 as pb

utf8 = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


def solve_bytes(**kw: object) -> bytes:
    return pb.SolveRequest(**kw).SerializeToString()


def test_decode_solve_reads_placement_fields() -> None:
    buf = solve_bytes(
        Ref="abc123",
        Definition=b"\x0a\x03def" * 10,
        Session="sess-1",
        Frontend="dockerfile.v0",
        FrontendAttrs={"target": "app", "local-sessionid:context": "shared-1",
                       "local-sessionid:dockerfile": "shared-2", "platform": "linux/amd64"},
        Internal=False,
        SourcePolicySession="policy-s",
    )
    info = wire.decode_solve(buf)
    assert info.ref == "abc123"
    assert info.session == "sess-1"
    assert info.internal is False
    assert set(info.shared_sessions) == {"shared-1", "shared-2", "policy-s"}
    assert len(info.shared_sessions) == 3
    assert info.sessions()[0] == "sess-1"
    assert set(info.sessions()) == {"sess-1", "shared-1", "shared-2", "policy-s"}


def test_decode_solve_internal_probe() -> None:
    info = wire.decode_solve(solve_bytes(Ref="probe", Session="s", Internal=True))
    assert info == SolveInfo("probe", "s", True, ())


def test_shared_sessions_deduplicated_and_empty_values_ignored() -> None:
    buf = solve_bytes(Ref="r", FrontendAttrs={"local-sessionid:a": "same", "local-sessionid:b":
                                              "same", "local-sessionid:c": ""},
                      SourcePolicySession="same")
    info = wire.decode_solve(buf)
    assert info.shared_sessions == ("same",)
    assert info.session == ""
    assert info.sessions() == ("same",)


def test_non_session_attrs_are_ignored() -> None:
    buf = solve_bytes(Ref="r", Session="s", FrontendAttrs={"sharedkey:localdir:x": "v",
                                                           "local-sessionid": "nope",
                                                           "context:local-sessionid:x": "nope"})
    assert wire.decode_solve(buf).shared_sessions == ()


def test_missing_ref_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        wire.decode_solve(solve_bytes(Session="s"))
    with pytest.raises(DecodeError):
        wire.decode_solve(b"")


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    extra = (
        bytes([(3 << 3) | 0]) + b"\x96\x01"  # varint
        + bytes([(4 << 3) | 1]) + b"12345678"  # fixed64
        + bytes([(8 << 3) | 5]) + b"1234"  # fixed32
        + bytes([(9 << 3) | 2]) + b"\x03abc"  # length-delimited
        + b"\xa0\x01" + b"\x05"  # field 20 (two-byte key), varint
        + b"\xfa\xff\xff\xff\x0f" + b"\x00"  # field 2^28-1, length-delimited, empty
    )
    buf = extra + solve_bytes(Ref="r", Session="s") + extra
    assert wire.decode_solve(buf) == SolveInfo("r", "s", False, ())


def test_last_value_of_a_repeated_scalar_wins() -> None:
    # protobuf semantics for a non-repeated field seen twice: the last one counts
    buf = solve_bytes(Ref="first") + solve_bytes(Ref="second", Session="s")
    assert wire.decode_solve(buf).ref == "second"
    assert pb.SolveRequest.FromString(buf).Ref == "second"


@settings(max_examples=200, deadline=None)
@given(
    ref=utf8.filter(bool),
    session=utf8,
    internal=st.booleans(),
    attrs=st.dictionaries(utf8, utf8, max_size=5),
    shared=st.dictionaries(utf8, utf8, max_size=3),
    policy=utf8,
    definition=st.binary(max_size=300),
)
def test_round_trip_against_protobuf(ref: str, session: str, internal: bool,
                                     attrs: dict[str, str], shared: dict[str, str],
                                     policy: str, definition: bytes) -> None:
    front = dict(attrs)
    front.update({"local-sessionid:" + k: v for k, v in shared.items()})
    buf = solve_bytes(Ref=ref, Session=session, Internal=internal, FrontendAttrs=front,
                      SourcePolicySession=policy, Definition=definition, Frontend="gateway.v0")
    info = wire.decode_solve(buf)
    assert info.ref == ref
    assert info.session == session
    assert info.internal is internal
    expected = {v for k, v in front.items() if k.startswith("local-sessionid:") and v}
    if policy:
        expected.add(policy)
    assert set(info.shared_sessions) == expected
    assert len(info.shared_sessions) == len(expected)


@settings(max_examples=500, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_raises_only_decode_error(garbage: bytes) -> None:
    try:
        info = wire.decode_solve(garbage)
    except DecodeError:
        return
    assert isinstance(info, SolveInfo)
    assert info.ref


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 10_000), junk=st.binary(max_size=8))
def test_truncated_messages_raise_only_decode_error(cut: int, junk: bytes) -> None:
    buf = solve_bytes(Ref="r" * 20, Session="s" * 30, FrontendAttrs={"local-sessionid:x": "y"},
                      Definition=b"d" * 100, Internal=True, SourcePolicySession="p")
    cut %= len(buf)
    for candidate in (buf[:cut], buf[:cut] + junk):
        try:
            wire.decode_solve(candidate)
        except DecodeError:
            pass


@pytest.mark.parametrize(
    "buf",
    [
        b"\x0a\x05ab",  # Ref runs past the end
        b"\x0a\x02\xff\xfe",  # Ref not UTF-8
        b"\x08\x01",  # Ref as a varint
        b"\x00\x01",  # field number 0
        b"\x0b",  # wire type 3 (group)
        b"\x0c",  # wire type 4
        b"\x0e",  # wire type 6
        b"\x0a",  # truncated length
        b"\x0a\x01r" + b"\x09abc",  # fixed64 truncated
        b"\x0a\x01r" + b"\x0d\x01",  # fixed32 truncated
        b"\x0a\x01r" + b"\x80" * 11,  # varint too long
        b"\x0a\x01r" + b"\x3a\x04\x0a\x02\xc3\x28",  # FrontendAttrs key not UTF-8
        b"\x0a\x01r" + b"\x3a\x03\x0a\x05a",  # FrontendAttrs entry truncated
        b"\x0a\x01r" + b"\x2a\x01\xff",  # Session not UTF-8
        b"\x0a\x01r" + b"\x78\x05",  # SourcePolicySession as varint
    ],
)
def test_malformed_solve_requests(buf: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode_solve(buf)


def test_decode_ref() -> None:
    assert wire.decode_ref(pb.StatusRequest(Ref="status-ref").SerializeToString()) == "status-ref"
    hist = pb.BuildHistoryRequest(ActiveOnly=True, Ref="hist-ref", EarlyExit=True)
    assert wire.decode_ref(hist.SerializeToString(), field=2) == "hist-ref"
    assert wire.decode_ref(pb.BuildHistoryRequest(ActiveOnly=True).SerializeToString(),
                           field=2) == ""
    assert wire.decode_ref(b"") == ""
    with pytest.raises(DecodeError):
        wire.decode_ref(b"\x0a\x09short")


# ---- gRPC length-prefixed messages ----------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=500), extra=st.binary(max_size=20))
def test_first_message_waits_for_the_whole_message(payload: bytes, extra: bytes) -> None:
    framed = wire.frame_message(payload)
    assert framed[:5] == struct.pack(">BL", 0, len(payload))
    for i in range(len(framed)):
        assert wire.first_message(framed[:i]) is None
    assert wire.first_message(framed) == payload
    assert wire.first_message(framed + extra) == payload
    assert wire.first_message(bytearray(framed + extra)) == payload


def test_first_message_rejects_compressed_even_when_partial() -> None:
    with pytest.raises(DecodeError, match="compressed"):
        wire.first_message(b"\x01\x00\x00\x00\x10")
    with pytest.raises(DecodeError):
        wire.first_message(b"\x01\x00\x00\x00\x02ab")
    assert wire.first_message(b"\x01\x00\x00\x00") is None  # prefix not complete yet


def test_first_message_rejects_oversized_length_before_buffering_it() -> None:
    assert wire.first_message(struct.pack(">BL", 0, wire.MAX_MESSAGE)) is None
    with pytest.raises(DecodeError, match="exceeds"):
        wire.first_message(struct.pack(">BL", 0, wire.MAX_MESSAGE + 1))
    with pytest.raises(DecodeError):
        wire.first_message(b"\x00\xff\xff\xff\xff")


def test_first_message_of_an_empty_message() -> None:
    assert wire.first_message(b"\x00\x00\x00\x00\x00") == b""


def test_solve_request_framed_and_decoded() -> None:
    framed = wire.frame_message(solve_bytes(Ref="r", Session="s"))
    msg = wire.first_message(framed)
    assert msg is not None
    assert wire.decode_solve(msg) == SolveInfo("r", "s", False, ())


# ---- call classes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "cls"),
    [
        ("/moby.buildkit.v1.Control/Solve", CallClass.SOLVE),
        ("/moby.buildkit.v1.Control/Status", CallClass.STATUS),
        ("/moby.buildkit.v1.Control/Session", CallClass.SESSION),
        ("/moby.buildkit.v1.Control/ListWorkers", CallClass.CONTROL),
        ("/moby.buildkit.v1.Control/Info", CallClass.CONTROL),
        ("/moby.buildkit.v1.Control/DiskUsage", CallClass.CONTROL),
        ("/moby.buildkit.v1.Control/Prune", CallClass.CONTROL),
        ("/grpc.health.v1.Health/Check", CallClass.CONTROL),
        ("/grpc.health.v1.Health/Watch", CallClass.CONTROL),
        ("/moby.buildkit.v1.frontend.LLBBridge/Ping", CallClass.LLB),
        ("/moby.buildkit.v1.frontend.LLBBridge/Solve", CallClass.LLB),
        ("/moby.buildkit.v1.frontend.LLBBridge/Return", CallClass.LLB),
        ("/moby.buildkit.v1.frontend.LLBBridge/Evaluate", CallClass.LLB),
        ("/moby.buildkit.v1.frontend.LLBBridge/ReadFile", CallClass.LLB),
        ("/moby.buildkit.v1.Control/ListenBuildHistory", CallClass.HISTORY),
        ("/moby.buildkit.v1.Control/UpdateBuildHistory", CallClass.HISTORY),
        ("/containerd.services.content.v1.Content/Info", CallClass.CONTENT),
        ("/containerd.services.content.v1.Content/Read", CallClass.CONTENT),
        ("/opentelemetry.proto.collector.trace.v1.TraceService/Export", CallClass.OTHER),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", CallClass.OTHER),
        ("/moby.buildkit.v1.Control/Solve/", CallClass.OTHER),
        ("/moby.buildkit.v1.control/solve", CallClass.OTHER),
        ("", CallClass.OTHER),
    ],
)
def test_classify(path: str, cls: CallClass) -> None:
    assert wire.classify(path) is cls
