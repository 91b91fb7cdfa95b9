"""Fuzzing of every decoder fed by client bytes: typed errors only, plus cheap invariants.

Decoders: HTTP/2 frames (FrameReader and the parse_* helpers), HPACK blocks (HeaderDecoder),
the BuildKit messages the relay reads (SolveRequest, StatusRequest, BuildHistoryRequest,
UpdateBuildHistoryRequest, the gRPC message prefix), the metadata values placement parses
(:authority, :path, the session sharedkey, the LLB buildid) and the configuration (argv,
environment, YAML file). Each one either returns or raises the error its caller catches:
`ProtocolError` (frames, HPACK: COMPRESSION_ERROR), `DecodeError` (messages), `ConfigError`
(config; argparse's usage exit for bad argv); the metadata parsers raise nothing. Any other
exception fails the test.

Inputs are raw bytes and, to reach deep code, mostly-valid inputs (frames and messages built
field by field, blocks from a real HPACK encoder, protobuf-serialised requests) with mutations.

Examples per test: the "ci" profile (default, bounded: the file runs in seconds) or the "long"
one with HYPOTHESIS_PROFILE=long (FUZZ_EXAMPLES examples per test, 200000 unless set); see
bench/FUZZ.md.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.protobuf.message
import hpack
import pytest
import yaml
from hpack.table import HeaderTable
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from gateway import config
from gateway.buildkit import wire
from gateway.buildkit.wire import CallClass, DecodeError, SolveInfo
from gateway.config import ConfigError, Settings
from gateway.h2 import frames as fr
from gateway.h2 import headers as hd
from gateway.h2.frames import COMPRESSION_ERROR, FrameReader, ProtocolError
from gateway.pb import control_pb2 as pb
from gateway.routing import key
from tests.fakes.frames import fresh_block, named

# ---- profiles ------------------------------------------------------------------------------

_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.large_base_example]
settings.register_profile("fuzz-decoders-ci", max_examples=200, deadline=None,
                          suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("fuzz-decoders-long", max_examples=int(os.environ.get(
    "FUZZ_EXAMPLES", "200000")), deadline=None, suppress_health_check=_HEALTH, print_blob=True)
# Applied per test (not loaded globally: the other test modules keep their own settings).
FUZZ = settings.get_profile("fuzz-decoders-long" if _LONG else "fuzz-decoders-ci")
# The configuration tests build an argparse parser and write a file per example: fewer.
FUZZ_SLOW = settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 4))
# pyproject's 120 s per-test timeout fits the ci profile; a long run takes longer per test.
pytestmark = [pytest.mark.timeout(0)] if _LONG else []


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid input with a few byte-level mutations: flips, truncation, insertion, deletion,
    overwrite, duplication of a slice."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set", "dup"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "set" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == "dup":
            data[at:at] = data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


# ---- HTTP/2 frames ----------------------------------------------------------------------------

MAX_FRAMES = (fr.DEFAULT_MAX_FRAME_SIZE, 2**24 - 1, 64)
FrameTuple = tuple[int, int, int, bytes, int]


def reference_frames(data: bytes, max_frame: int) -> tuple[list[FrameTuple], int | None, int]:
    """A plain re-reading of RFC 9113 section 4.1/6.1/6.2: (frames, error code or None, bytes
    left over). Error codes as frames.py chooses them."""
    out: list[FrameTuple] = []
    pos = 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos:pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        if length > max_frame:
            return out, fr.FRAME_SIZE_ERROR, 0
        if pos + 9 + length > len(data):
            break
        payload = data[pos + 9:pos + 9 + length]
        if ftype in (fr.DATA, fr.HEADERS) and flags & fr.FLAG_PADDED:
            if not payload or payload[0] >= len(payload):
                return out, fr.PROTOCOL_ERROR, 0
            payload = payload[1:len(payload) - payload[0]]
            flags &= ~fr.FLAG_PADDED
        if ftype == fr.HEADERS and flags & fr.FLAG_PRIORITY:
            if len(payload) < 5:
                return out, fr.FRAME_SIZE_ERROR, 0
            payload = payload[5:]
            flags &= ~fr.FLAG_PRIORITY
        out.append((ftype, flags, sid, payload, length))
        pos += 9 + length
    return out, None, len(data) - pos


@st.composite
def frame_bytes(draw: st.DrawFn) -> bytes:
    """One frame, mostly well-formed: any type (known or not), flags, stream id; DATA and
    HEADERS often padded and with priority fields; sometimes a length that lies."""
    ftype = draw(st.one_of(st.integers(0, 9), st.integers(0, 255)))
    flags = draw(st.one_of(st.sampled_from([0, 1, 4, 5, 8, 9, 0x20, 0x24, 0x28, 0x2D]),
                           st.integers(0, 255)))
    sid = draw(st.one_of(st.integers(0, 9), st.integers(0, 2**32 - 1)))
    body = draw(st.binary(max_size=96))
    if ftype in (fr.DATA, fr.HEADERS):
        if ftype == fr.HEADERS and flags & fr.FLAG_PRIORITY and draw(st.booleans()):
            body = draw(st.binary(min_size=5, max_size=5)) + body
        if flags & fr.FLAG_PADDED and draw(st.booleans()):
            pad = draw(st.integers(0, 40))
            body = bytes([pad]) + body + bytes(pad)
    elif ftype == fr.SETTINGS:
        body = b"".join(draw(st.lists(st.binary(min_size=6, max_size=6), max_size=4)))
    elif ftype in (fr.WINDOW_UPDATE, fr.RST_STREAM):
        body = draw(st.binary(min_size=4, max_size=4))
    length = len(body)
    if draw(st.integers(0, 9)) == 0:  # a lying length field
        length = draw(st.one_of(st.integers(0, len(body) + 16), st.integers(0, 2**24 - 1)))
    return fr.frame_header(length, ftype, flags, sid) + body


frame_streams = st.one_of(
    st.binary(max_size=600),
    st.lists(frame_bytes(), max_size=8).map(b"".join),
    mutated(st.lists(frame_bytes(), max_size=8).map(b"".join)),
)


def _feed_all(reader: FrameReader, chunks: list[bytes | memoryview]
              ) -> tuple[list[FrameTuple], int | None]:
    got: list[FrameTuple] = []
    try:
        for chunk in chunks:
            for f in named(reader.feed(chunk)):
                assert isinstance(f.payload, memoryview)
                got.append((f.type, f.flags, f.stream_id, bytes(f.payload), f.flow_len))
    except ProtocolError as exc:
        assert type(exc) is ProtocolError  # a connection error, never a StreamError here
        return got, exc.code
    return got, None


@FUZZ
@given(data=frame_streams, max_frame=st.sampled_from(MAX_FRAMES), draw=st.data())
def test_frame_reader_whole_and_split_agree_with_the_reference(
        data: bytes, max_frame: int, draw: st.DataObject) -> None:
    want, want_error, left = reference_frames(data, max_frame)
    whole = FrameReader(max_frame_size=max_frame)
    got, error = _feed_all(whole, [data])
    assert error == want_error
    if want_error is None:
        assert got == want
        assert whole.buffered == left
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=12), label="cuts"))
    as_views = draw.draw(st.booleans(), label="as memoryviews of fresh bytearrays")
    chunks: list[bytes | memoryview] = []
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):  # empty chunks too
        chunk = data[start:stop]
        chunks.append(memoryview(bytearray(chunk)) if as_views else chunk)
    split = FrameReader(max_frame_size=max_frame)
    got, error = _feed_all(split, chunks)
    assert error == want_error
    if want_error is None:
        assert got == want
        assert split.buffered == left
    else:  # the frames handed over before the error are the stream's first frames
        assert got == want[:len(got)]


@FUZZ
@given(payload=st.one_of(st.binary(max_size=64), mutated(st.binary(max_size=64))))
def test_frame_payload_parsers(payload: bytes) -> None:
    for parse in (fr.parse_settings, fr.parse_u32, fr.parse_code, fr.parse_goaway):
        try:
            result = parse(memoryview(payload))
        except ProtocolError as exc:
            assert exc.code == fr.FRAME_SIZE_ERROR
            continue
        if parse is fr.parse_settings:
            assert isinstance(result, list)
            assert len(result) * 6 == len(payload)
            assert fr.settings(result) == fr.frame(fr.SETTINGS, 0, 0, payload)
        elif parse is fr.parse_u32:
            assert isinstance(result, int)
            assert 0 <= result < 2**31
        elif parse is fr.parse_code:
            assert isinstance(result, int)
            assert fr.rst_stream(1, result)[9:] == payload
        else:
            assert isinstance(result, tuple)
            last, code, debug = result
            assert 0 <= last < 2**31 and 0 <= code < 2**32
            assert debug == payload[8:] and type(debug) is bytes


# ---- HPACK ----------------------------------------------------------------------------------

STATIC = list(HeaderTable.STATIC_TABLE)
METADATA_NAMES = [wire.SESSION_UUID, wire.SESSION_SHAREDKEY, wire.BUILD_ID, b":authority",
                  b":path", b"grpc-timeout", b"content-type", b"te", b"user-agent"]
header_names = st.one_of(st.sampled_from(sorted({n for n, _ in STATIC}) + METADATA_NAMES),
                         st.binary(max_size=24))
header_values = st.one_of(st.sampled_from([v for _, v in STATIC]), st.binary(max_size=120))
header_lists = st.lists(st.one_of(st.sampled_from(STATIC), st.tuples(header_names,
                                                                    header_values)),
                        max_size=12)
# (max_header_list_size, max_expansion, floor): a replica's decoder and a client's.
DECODERS = st.sampled_from([(16 << 20, 0, 0), (64 << 10, 0, 0), (16 << 20, 16, 64 << 10),
                            (4096, 16, 256), (100, 2, 0)])


def _bound(limits: tuple[int, int, int], block: bytes) -> int:
    """The largest list a block may decode to (headers.py: HPACK bombs)."""
    size, expansion, floor = limits
    return min(size, max(floor, expansion * len(block))) if expansion else size


def _decode(decoder: hd.HeaderDecoder, block: bytes) -> hd.Headers | None:
    """The decoded list, or None after the (only allowed) COMPRESSION_ERROR."""
    try:
        got = decoder.decode(block)
    except ProtocolError as exc:
        assert type(exc) is ProtocolError
        assert exc.code == COMPRESSION_ERROR
        return None
    assert isinstance(got, list)
    assert all(type(n) is bytes and type(v) is bytes for n, v in got)
    return got


def _hpack_blocks(draw: st.DrawFn, lists: list[hd.Headers]) -> list[bytes]:
    """Blocks of a real, stateful HPACK encoder (dynamic table, Huffman, table size
    updates), as a peer using the dynamic table the gateway allows sends them."""
    encoder = hpack.Encoder()
    if draw(st.booleans()):
        encoder.header_table_size = draw(st.sampled_from([0, 256, 4096]))
    huffman = draw(st.booleans())
    return [encoder.encode(h, huffman=huffman) for h in lists]


@FUZZ
@given(limits=DECODERS, blocks=st.lists(st.one_of(st.binary(max_size=300),
                                                  mutated(header_lists.map(fresh_block))),
                                        min_size=1, max_size=4))
def test_header_decoder_arbitrary_blocks(limits: tuple[int, int, int],
                                         blocks: list[bytes]) -> None:
    size, expansion, floor = limits
    decoder = hd.HeaderDecoder(max_header_list_size=size, max_expansion=expansion, floor=floor)
    for block in blocks:
        if _decode(decoder, block) is None:
            break  # the connection ends here


@FUZZ
@given(limits=DECODERS, lists=st.lists(header_lists, min_size=1, max_size=4), draw=st.data())
def test_header_decoder_mutated_encoder_blocks(limits: tuple[int, int, int],
                                               lists: list[hd.Headers],
                                               draw: st.DataObject) -> None:
    """A peer's blocks decode to what it encoded; one mutated block is a COMPRESSION_ERROR or
    a list, never another exception."""
    size, expansion, floor = limits
    blocks = _hpack_blocks(draw.draw, lists)
    bad = draw.draw(st.integers(0, len(blocks) - 1), label="mutated block")
    blocks[bad] = draw.draw(mutated(st.just(blocks[bad])), label="mutation")
    decoder = hd.HeaderDecoder(max_header_list_size=size, max_expansion=expansion, floor=floor)
    for i, (block, headers) in enumerate(zip(blocks, lists, strict=True)):
        got = _decode(decoder, block)
        if got is None:
            # only the mutated block, or one decoding to more than its bound
            assert i >= bad or hd.list_size(headers) > _bound(limits, block)
            break
        if i < bad:
            assert got == headers


@FUZZ
@given(blocks=st.lists(st.one_of(st.binary(max_size=80), mutated(header_lists.map(fresh_block))),
                       min_size=1, max_size=4))
def test_header_decoder_agrees_with_the_hpack_library(blocks: list[bytes]) -> None:
    """The gateway's own HPACK decoder against the `hpack` library's on any bytes: the same
    list, or both refuse (and the connection ends)."""
    ours = hd.HeaderDecoder(max_header_list_size=1 << 20)
    reference = hpack.Decoder(max_header_list_size=1 << 20)
    for block in blocks:
        try:
            expected: hd.Headers | None = [
                (bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)]
        except (hpack.HPACKError, ValueError, IndexError):
            expected = None
        assert _decode(ours, block) == expected
        if expected is None:
            break


@st.composite
def bomb(draw: st.DrawFn) -> tuple[bytes, int]:
    """An HPACK bomb: one large table entry, then many one-byte references to it; with the
    decoded size."""
    name = draw(st.binary(min_size=1, max_size=16))
    value = draw(st.binary(max_size=3000))
    refs = draw(st.integers(0, 3000))
    entry = b"\x40" + hd._string(name) + hd._string(value)  # literal with incremental indexing
    return entry + b"\xbe" * refs, (refs + 1) * (len(name) + len(value) + 32)


@FUZZ
@given(limits=DECODERS, case=st.one_of(header_lists.map(lambda h: (fresh_block(h),
                                                                     hd.list_size(h))), bomb()))
def test_header_decoder_bound_is_exact(limits: tuple[int, int, int],
                                       case: tuple[bytes, int]) -> None:
    """A block decodes iff its list fits min(max, max(floor, expansion x block size)); else a
    COMPRESSION_ERROR (an HPACK bomb costs the gateway at most that bound)."""
    size, expansion, floor = limits
    block, decoded_size = case
    bound = _bound(limits, block)
    decoder = hd.HeaderDecoder(max_header_list_size=size, max_expansion=expansion, floor=floor)
    got = _decode(decoder, block)
    assert (got is not None) == (decoded_size <= bound)
    if got is not None:
        assert hd.list_size(got) == decoded_size


# ---- BuildKit messages ----------------------------------------------------------------------

MASK64 = (1 << 64) - 1


def enc_varint(value: int, pad: int = 0) -> bytes:
    """A varint, with `pad` redundant continuation bytes (a non-minimal encoding)."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    for _ in range(pad):
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def enc_key(number: int, wtype: int) -> bytes:
    return enc_varint(number << 3 | wtype)


varint_values = st.one_of(
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 0)),
    st.tuples(st.integers(0, 2**35), st.integers(0, 4)),  # non-minimal, at most 10 bytes
    st.tuples(st.integers(2**64, 2**70 - 1), st.integers(0, 0)),  # 10 bytes, > 64 bits
    st.tuples(st.sampled_from([0, 1, 2, 2**63, 2**64]), st.integers(0, 0)),
)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
# Mostly UTF-8, sometimes not (protobuf rejects a string field that is not).
string_bytes = st.one_of(*[texts.map(str.encode)] * 4, st.binary(max_size=12))
attr_keys = st.one_of(st.sampled_from(["local-sessionid:context", "local-sessionid:dockerfile",
                                       "local-sessionid:", "local-sessionid", "target",
                                       "sharedkey:localdir:x"]), texts).map(str.encode)
# Field numbers of the messages the gateway reads, and how each is encoded.
SOLVE_SCHEMA = {1: "string", 2: "bytes", 5: "string", 6: "string", 7: "attrs", 11: "varint",
                15: "string"}
STATUS_SCHEMA = {1: "string"}
HISTORY_SCHEMA = {1: "varint", 2: "string", 3: "varint", 4: "string", 5: "varint"}
UPDATE_HISTORY_SCHEMA = {1: "string", 2: "varint", 3: "varint", 4: "varint"}


@st.composite
def length_delimited(draw: st.DrawFn, number: int, payload: bytes) -> bytes:
    return (enc_key(number, 2) + enc_varint(len(payload), draw(st.integers(0, 2)) if
                                             draw(st.integers(0, 4)) == 0 else 0) + payload)


@st.composite
def unknown_field(draw: st.DrawFn, known: frozenset[int]) -> bytes:
    number = draw(st.one_of(st.integers(1, 40), st.integers(1, 2**29 - 1),
                            st.integers(2**29, 2**35)))  # the last: invalid, refused by both
    if number in known:
        number += 40  # known numbers are all below 16
    wtype = draw(st.sampled_from([0, 1, 2, 5]))
    if wtype == 0:
        value, pad = draw(varint_values)
        return enc_key(number, 0) + enc_varint(value, pad)
    if wtype == 2:
        return draw(length_delimited(number, draw(st.binary(max_size=16))))
    return enc_key(number, wtype) + draw(st.binary(min_size=8 if wtype == 1 else 4,
                                                   max_size=8 if wtype == 1 else 4))


@st.composite
def attr_entry(draw: st.DrawFn) -> bytes:
    """A FrontendAttrs map entry: key 1, value 2, in any order, repeated or missing, with
    unknown fields."""
    parts = draw(st.lists(st.one_of(
        attr_keys.flatmap(lambda k: length_delimited(1, k)),
        string_bytes.flatmap(lambda v: length_delimited(2, v)),
        unknown_field(frozenset({1, 2})),
    ), max_size=4))
    return b"".join(parts)


@st.composite
def wire_message(draw: st.DrawFn, schema: dict[int, str]) -> bytes:
    """A message built field by field with each known field's own wire type (so protobuf and
    the gateway must agree on it): duplicates, any order, non-minimal and over-long varints,
    unknown fields of every wire type protobuf 3 keeps."""
    known = frozenset(schema)
    fields: list[bytes] = []
    if schema.get(1) == "string" and draw(st.integers(0, 3)):  # usually a Ref first
        fields.append(draw(length_delimited(1, draw(texts.map(str.encode)))))
    for _ in range(draw(st.integers(0, 8))):
        number = draw(st.sampled_from([*schema, 0]))
        if number == 0:
            fields.append(draw(unknown_field(known)))
            continue
        kind = schema[number]
        if kind == "varint":
            value, pad = draw(varint_values)
            fields.append(enc_key(number, 0) + enc_varint(value, pad))
        elif kind == "attrs":
            fields.append(draw(length_delimited(number, draw(attr_entry()))))
        else:
            payload = draw(string_bytes if kind == "string" else st.binary(max_size=24))
            if number == 1 and draw(st.booleans()):
                payload = draw(st.sampled_from([b"ref-a", b"ref-b", b"\xc3\xa9"]))
            fields.append(draw(length_delimited(number, payload)))
    return b"".join(fields)


solve_requests = st.builds(
    lambda **kw: pb.SolveRequest(**kw).SerializeToString(),
    Ref=texts, Definition=st.binary(max_size=48), Session=texts, Frontend=texts,
    FrontendAttrs=st.dictionaries(attr_keys.map(bytes.decode), texts, max_size=4),
    Internal=st.booleans(), SourcePolicySession=texts)
ref_requests = st.one_of(
    st.builds(lambda r: pb.StatusRequest(Ref=r).SerializeToString(), texts),
    st.builds(lambda **kw: pb.BuildHistoryRequest(**kw).SerializeToString(),
              ActiveOnly=st.booleans(), Ref=texts, EarlyExit=st.booleans(),
              Filter=st.lists(texts, max_size=3), Limit=st.integers(-2**31, 2**31 - 1)),
    st.builds(lambda **kw: pb.UpdateBuildHistoryRequest(**kw).SerializeToString(),
              Ref=texts, Pinned=st.booleans(), Delete=st.booleans(), Finalize=st.booleans()),
)
any_message = st.one_of(
    st.binary(max_size=200),
    mutated(solve_requests), mutated(ref_requests),
    mutated(wire_message(SOLVE_SCHEMA)), mutated(wire_message(HISTORY_SCHEMA)),
)
HISTORY_PATHS = ["/moby.buildkit.v1.Control/ListenBuildHistory",
                 "/moby.buildkit.v1.Control/UpdateBuildHistory"]


def _check_solve_info(info: SolveInfo) -> None:
    assert type(info.ref) is str and info.ref
    assert type(info.session) is str
    assert type(info.internal) is bool
    assert type(info.shared_sessions) is tuple
    assert all(type(s) is str and s for s in info.shared_sessions)
    assert len(set(info.shared_sessions)) == len(info.shared_sessions)
    assert all(type(s) is str and s for s in info.sessions())


@FUZZ
@given(buf=any_message)
def test_fields_and_decoders_raise_decode_error_only(buf: bytes) -> None:
    try:
        found = list(wire.fields(buf))
    except DecodeError:
        found = None
    for number, wtype, value in found or ():
        assert 1 <= number <= 2**29 - 1
        if wtype == 0:
            assert type(value) is int and 0 <= value <= MASK64
        else:
            assert wtype == 2 and type(value) is bytes
    with contextlib.suppress(DecodeError):
        _check_solve_info(wire.decode_solve(buf))
    for field in (1, 2):
        with contextlib.suppress(DecodeError):
            assert type(wire.decode_ref(buf, field=field)) is str
    for path in HISTORY_PATHS:
        with contextlib.suppress(DecodeError):
            assert type(wire.history_ref(path, buf)) is str


def _parse_pb(cls: type[Any], buf: bytes) -> Any:
    try:
        return cls.FromString(buf)
    except google.protobuf.message.DecodeError:
        return None


@FUZZ
@given(buf=wire_message(SOLVE_SCHEMA))
def test_decode_solve_reads_what_protobuf_reads(buf: bytes) -> None:
    """Differential: wherever protobuf (upb) accepts a SolveRequest whose known fields have
    their own wire types, the gateway reads the same Ref, Session and Internal, and the
    sessions it shares include the FrontendAttrs local-sessionid:* values and the
    SourcePolicySession protobuf sees (more only for a repeated map key or field 15: the
    gateway keeps every value, protobuf the last; or for a map entry holding an unknown
    field, which upb drops and Go's decoders keep)."""
    want = _parse_pb(pb.SolveRequest, buf)
    if want is None:
        with contextlib.suppress(DecodeError):
            _check_solve_info(wire.decode_solve(buf))
        return
    if not want.Ref:
        with pytest.raises(DecodeError, match="no Ref"):
            wire.decode_solve(buf)
        return
    info = wire.decode_solve(buf)
    event("SolveRequest: both decoded")
    _check_solve_info(info)
    assert (info.ref, info.session, info.internal) == (want.Ref, want.Session, want.Internal)
    shared = {v for k, v in want.FrontendAttrs.items() if k.startswith("local-sessionid:") and v}
    shared |= {want.SourcePolicySession} - {""}
    assert shared <= set(info.shared_sessions)
    entries = [v for n, _w, v in wire.fields(buf) if n == 7 and isinstance(v, bytes)]
    keys = [k for entry in entries for n, _w, k in wire.fields(entry) if n == 1]
    # upb drops a map entry holding an unknown field (Go keeps it, as the gateway does)
    plain = all(set(_numbers(entry)) <= {1, 2} for entry in entries)
    if plain and len(keys) == len(set(keys)) and _numbers(buf).count(15) <= 1:
        assert shared == set(info.shared_sessions)


def _numbers(buf: bytes) -> list[int]:
    """The field numbers of a well-formed message, fixed-width fields included (which
    `wire.fields` skips)."""
    numbers: list[int] = []
    pos = 0
    while pos < len(buf):
        tag, pos = wire._varint(buf, pos)
        numbers.append(tag >> 3)
        if tag & 7 == 0:
            pos = wire._varint(buf, pos)[1]
        elif tag & 7 == 2:
            size, pos = wire._varint(buf, pos)
            pos += size
        else:
            pos += 8 if tag & 7 == 1 else 4
    return numbers


@FUZZ
@given(case=st.one_of(
    st.tuples(st.just(pb.StatusRequest), st.just("/moby.buildkit.v1.Control/Status"),
              wire_message(STATUS_SCHEMA)),
    st.tuples(st.just(pb.BuildHistoryRequest), st.just(HISTORY_PATHS[0]),
              wire_message(HISTORY_SCHEMA)),
    st.tuples(st.just(pb.UpdateBuildHistoryRequest), st.just(HISTORY_PATHS[1]),
              wire_message(UPDATE_HISTORY_SCHEMA)),
))
def test_refs_are_read_as_protobuf_reads_them(case: tuple[type[Any], str, bytes]) -> None:
    """Differential: the Ref of a StatusRequest (field 1), BuildHistoryRequest (2) and
    UpdateBuildHistoryRequest (1) is protobuf's, the last one when repeated."""
    cls, path, buf = case
    want = _parse_pb(cls, buf)
    field = 2 if cls is pb.BuildHistoryRequest else 1
    if want is None:
        with contextlib.suppress(DecodeError):
            wire.decode_ref(buf, field=field)
        return
    assert wire.decode_ref(buf, field=field) == want.Ref
    if cls is not pb.StatusRequest:
        assert wire.history_ref(path, buf) == want.Ref


@FUZZ
@given(buf=st.one_of(
    st.binary(max_size=40),
    st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=40)).map(
        lambda t: wire.GRPC_PREFIX.pack(t[0], t[1]) + t[2]),
    st.tuples(st.sampled_from([0, 1]), st.binary(max_size=40), st.binary(max_size=8)).map(
        lambda t: wire.GRPC_PREFIX.pack(t[0], len(t[1])) + t[1] + t[2]),
))
def test_grpc_message_prefix(buf: bytes) -> None:
    """`first_message`: None until complete, the message once complete, DecodeError for a
    compressed or too large one; `message_size` agrees on any 5-byte prefix."""
    try:
        message = wire.first_message(buf)
    except DecodeError:
        assert len(buf) >= 5
        flag, size = wire.GRPC_PREFIX.unpack_from(buf)
        assert flag or size > wire.MAX_MESSAGE
        with pytest.raises(DecodeError):
            wire.message_size(buf[:5])
        return
    if len(buf) < 5:
        assert message is None
        return
    size = wire.message_size(buf[:5])
    assert size == int.from_bytes(buf[1:5], "big")
    if message is None:
        assert len(buf) < 5 + size
    else:
        assert message == buf[5:5 + size] and len(message) == size
    assert wire.first_message(bytearray(buf)) == message


# ---- metadata -------------------------------------------------------------------------------

hosts = st.one_of(
    st.from_regex(r"[A-Za-z0-9.-]{1,20}", fullmatch=True),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.sampled_from(["localhost", "LOCALHOST", "", "[", "[]", ":", "::", "a:b:c", "%", "1.2.3",
                     "0x7f.1", "1.2.3.4%eth0", "fe80::1%eth0", "ä.example", "xn--bcher-kva.ch"]),
)
authorities = st.one_of(
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "replace")),
    st.tuples(hosts, st.one_of(st.just(""), st.integers(0, 99999).map(lambda p: f":{p}"),
                               st.sampled_from([":", ":x", "::"]))).map("".join),
)
header_text = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"/srv/ctx:node1", b":node", b"ctx:", b"a:b:c", b"\xff:\xfe", b""]),
    st.tuples(st.binary(max_size=20), st.binary(max_size=20)).map(b":".join),
).map(lambda b: b.decode("utf-8", "replace"))  # as the relay decodes header values
paths = st.one_of(
    st.sampled_from([*wire._BY_PATH, "/moby.buildkit.v1.frontend.LLBBridge/Solve",
                     "/containerd.services.content.v1.Content/Read", "", "/"]),
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", "replace")),
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@FUZZ
@given(authority=authorities, sharedkey=header_text, client=st.one_of(st.none(), header_text),
       path=paths, build_id=header_text)
def test_metadata_parsers_are_total(authority: str, sharedkey: str, client: str | None,
                                    path: str, build_id: str) -> None:
    """The metadata parsers never raise, and their results make sense."""
    assert isinstance(wire.classify(path), CallClass)
    name = key.authority_name(authority)
    if name is not None:
        assert name and name in authority.lower()
        assert name != "localhost" and not name.startswith("[") and not _is_ip(name)
    if _is_ip(authority) or authority.startswith("[") or authority.lower() == "localhost":
        assert name is None
    part = key.context_part(sharedkey)
    assert sharedkey.startswith(part)
    assert ":" not in sharedkey or sharedkey == part + ":" + sharedkey.rsplit(":", 1)[1]
    placement = key.placement_key(sharedkey=sharedkey, authority=authority, client=client)
    if part:
        assert placement == "ctx:" + part
    elif name:
        assert placement == "host:" + name
    elif client:
        assert placement == "client:" + client
    else:
        assert placement is None
    # The LLBBridge buildid is used as a Ref verbatim, and routes like any string.
    assert key.placement_key(sharedkey=build_id, authority="", client=None) in (
        None, "ctx:" + key.context_part(build_id))


@FUZZ
@given(fields=st.lists(st.tuples(st.sampled_from(METADATA_NAMES), st.binary(max_size=40)),
                       max_size=8), draw=st.data())
def test_metadata_through_the_header_decoder(fields: list[tuple[bytes, bytes]],
                                             draw: st.DataObject) -> None:
    """Client metadata as the relay sees it: a header block (ours or a peer encoder's,
    perhaps mutated), decoded, looked up and parsed; typed errors only."""
    block = draw.draw(st.one_of(st.just(fresh_block(fields)),
                                st.just(hpack.Encoder().encode(fields)),
                                mutated(st.just(fresh_block(fields)))))
    decoder = hd.HeaderDecoder(max_header_list_size=16 << 20, max_expansion=16,
                               floor=64 << 10)
    headers = _decode(decoder, block)
    if headers is None:
        return
    text = {n: (hd.get(headers, n) or b"").decode("utf-8", "replace") for n in METADATA_NAMES}
    assert all(type(v) is bytes for v in hd.get_all(headers, wire.BUILD_ID))
    wire.classify(text[b":path"])
    key.placement_key(sharedkey=text[wire.SESSION_SHAREDKEY], authority=text[b":authority"],
                      client=None)


# ---- configuration --------------------------------------------------------------------------


def _load(argv: list[str], environ: dict[str, str]) -> Settings | None:
    """`config.load`: Settings, or None after a ConfigError or argparse's usage exit."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            settings_ = config.load(argv, environ)
    except ConfigError as exc:
        assert str(exc)
        event("config: ConfigError")
        return None
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        assert exc.code in (0, 2), exc.code
        event("config: argparse exit")
        return None
    assert isinstance(settings_, Settings)
    event("config: Settings")
    assert settings_.listen.endpoints and settings_.pools[0].name == "default"
    assert settings_.relay.stream_window <= settings_.relay.connection_window < 2**31
    return settings_


FLAGS = [o.flag for o in config.OPTIONS]
# Command-line text as Python sees it: no NUL (execve cannot pass one), lone surrogates for
# bytes that are not UTF-8 (surrogateescape).
arg_text = st.text(st.characters(exclude_characters="\x00",
                                 exclude_categories=("Cs",)) | st.characters(
    min_codepoint=0xDC80, max_codepoint=0xDCFF), max_size=30)
option_values = st.one_of(
    st.sampled_from(["tcp://127.0.0.1:1234", "tcp://[::1]:0", "unix:///run/gw.sock",
                     "tcp://h:65536", "unix://rel", "5s", "250ms", "1.5", "0", "-1", "1e3",
                     "1" * 30, "sticky", "random", "json", "DEBUG", "", "127.0.0.1:9180",
                     ":0", "[::1]:80", "http", "17825797", "2147483648", "nan", "inf",
                     "a-b.c", "UPPER", "1,2", "tcp://a:1,tcp://b:2", "yes", "true"]),
    arg_text,
)
# Values each option accepts (by its converter; else its default), so that many generated
# configurations get through to Settings and its cross-checks.
_GOOD_BY_CONVERTER: dict[Any, list[Any]] = {
    config.parse_endpoint: ["tcp://127.0.0.1:0", "tcp://10.0.0.2:1234", "tcp://[fd00::1]:1",
                            "unix:///run/gw.sock"],
    config.parse_duration: ["250ms", "5s", "2m", "1h", "0", "1.5", 3],
    config._count: ["0", "3", 10],
    config._positive_int: ["1", "1000", "16777216", "268435456"],
    config._stream_window: ["17825797", "33554432"],
    config._load_factor: ["1", "1.25", 2],
    config._host_port: ["", "127.0.0.1:0", "[::1]:9180"],
    config._kube_port: ["1234", "grpc"],
    config._name: ["", "buildkitd", "ns-1"],
}


def _good(opt: config.Option) -> list[Any]:
    good = _GOOD_BY_CONVERTER.get(opt.convert)
    if good is None:
        good = opt.default if isinstance(opt.default, list) else [opt.default]
    return good or ["tcp://10.0.0.3:1234"]


GOOD = {o.key: _good(o) for o in config.OPTIONS}
good_pairs = st.sampled_from(config.OPTIONS).flatmap(
    lambda o: st.tuples(st.just(o.flag), st.sampled_from(GOOD[o.key]).map(str)))
any_pairs = st.tuples(st.sampled_from(FLAGS), option_values)
argv_tokens = st.one_of(
    good_pairs.map(list), good_pairs.map(list), good_pairs.map(list),
    any_pairs.map(list),
    st.one_of(good_pairs, any_pairs).map(lambda t: [f"{t[0]}={t[1]}"]),
    st.tuples(st.sampled_from(FLAGS)).map(list),
    st.tuples(arg_text).map(list),
    st.sampled_from([["--help"], ["-h"], ["--"], ["-"], ["--max"]]),
)


def _flat(parts: list[list[str]]) -> list[str]:
    return [token for part in parts for token in part]


environments = st.dictionaries(
    st.one_of(st.sampled_from([o.env for o in config.OPTIONS]),
              st.text(st.characters(exclude_characters="\x00="), max_size=10)),
    st.one_of(option_values, st.lists(option_values, max_size=3).map(",".join)).filter(
        lambda v: "\x00" not in v),
    max_size=4,
) | st.sampled_from(config.OPTIONS).flatmap(
    lambda o: st.sampled_from(GOOD[o.key]).map(lambda v: {o.env: str(v)}))


@FUZZ_SLOW
@given(argv=st.lists(argv_tokens, max_size=6).map(_flat),
       environ=environments)
def test_config_from_argv_and_environment(argv: list[str], environ: dict[str, str]) -> None:
    # --config (and any abbreviation) would read a file named by random text: not here.
    assume(not any(a.startswith("--conf") for a in argv))
    environ.pop(config.ENV_PREFIX + "CONFIG", None)
    _load(argv, environ)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 2**40),
                         st.floats(allow_nan=True), option_values)


def _yaml_value(name: str) -> st.SearchStrategy[Any]:
    good = st.sampled_from(GOOD.get(name, [None]))
    return st.one_of(good, good, good.map(lambda v: [v]), yaml_scalars,
                     st.lists(yaml_scalars, max_size=3))


_POOL_OPTIONS = sorted(config._POOL_KEYS - {"name"})
pool_items = st.builds(
    lambda name, keys, extra: {**({"name": name} if name else {}), **keys, **extra},
    st.sampled_from(["a", "b", "gpu", "default", "Bad Name", "", 7]),
    st.sampled_from(_POOL_OPTIONS).flatmap(lambda k: _yaml_value(
        {"authority": "kube-namespace"}.get(k, k)).map(lambda v: {k: v})) | st.just({}),
    st.dictionaries(st.sampled_from(_POOL_OPTIONS) | st.text(max_size=6), yaml_scalars,
                    max_size=2) | st.just({}),
)
option_documents = st.lists(
    st.sampled_from([o.key for o in config.OPTIONS]).flatmap(
        lambda k: _yaml_value(k).map(lambda v: (k, v))), max_size=8).map(dict)
yaml_documents = st.one_of(
    option_documents, option_documents,
    st.tuples(option_documents, st.lists(pool_items, max_size=3)).map(
        lambda t: {**t[0], "pools": t[1]}),
    st.dictionaries(st.one_of(st.sampled_from([o.key for o in config.OPTIONS] + ["pools"]),
                              st.text(max_size=8)),
                    st.one_of(yaml_scalars, st.lists(yaml_scalars, max_size=3),
                              st.dictionaries(st.text(max_size=4), yaml_scalars, max_size=2)),
                    max_size=4),
    st.lists(yaml_scalars, max_size=3),
    yaml_scalars,
).map(lambda doc: yaml.safe_dump(doc, allow_unicode=True))
yaml_files = st.one_of(
    yaml_documents.map(str.encode), yaml_documents.map(str.encode),
    mutated(yaml_documents.map(str.encode)),
    st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=120),
)


@pytest.fixture(scope="module")
def yaml_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-config-") as tmp:
        yield Path(tmp)


@FUZZ_SLOW
@given(text=yaml_files, argv=st.lists(argv_tokens, max_size=3).map(_flat),
       environ=environments, via_env=st.booleans())
def test_config_from_yaml_files(yaml_dir: Path, text: bytes, argv: list[str],
                                environ: dict[str, str], via_env: bool) -> None:
    assume(not any(a.startswith("--conf") for a in argv))
    path = yaml_dir / "gateway.yaml"
    path.write_bytes(text)
    note(f"YAML file: {text!r}")
    if via_env:
        environ[config.ENV_PREFIX + "CONFIG"] = str(path)
    else:
        environ.pop(config.ENV_PREFIX + "CONFIG", None)
        argv = [*argv, "--config", str(path)]
    _load(argv, environ)


def _load_yaml_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        config.load(["--config", str(path)], {})


@pytest.mark.parametrize("text", [
    "listen: 2020-99-99\n",  # PyYAML's constructor raises ValueError
    "max-builds: 1" + "0" * 5000 + "\n",  # past Python's integer digit limit
    "queue-timeout: 1" + "0" * 400 + "\n",  # float() overflows
    "load-factor: 1" + "0" * 400 + "\n",
    "pools: [{name: a, queue-timeout: 1" + "0" * 400 + "}]\n",
    "listen: " + "[" * 5000 + "]" * 5000 + "\n",  # nesting past the recursion limit
], ids=["bad-timestamp", "int-over-4300-digits", "duration", "load-factor", "pool-duration",
        "deep-nesting"])
def test_config_values_yaml_or_python_cannot_read_are_config_errors(tmp_path: Path,
                                                                    text: str) -> None:
    """Found by the fuzzing: these escaped `load` as ValueError, OverflowError and
    RecursionError instead of a ConfigError naming the problem."""
    _load_yaml_text(tmp_path, text)


# ---- regressions for the bugs the fuzzing found --------------------------------------------


def test_varints_are_64_bits_like_buildkit_reads_them() -> None:
    """A 10-byte varint's bits above 64 are dropped (gogo/vtproto and upb do so): Internal
    = 2^64 is false for BuildKit, so it must be for placement too (it was true)."""
    buf = pb.SolveRequest(Ref="r").SerializeToString() + enc_key(11, 0) + enc_varint(2**64)
    assert pb.SolveRequest.FromString(buf).Internal is False
    assert wire.decode_solve(buf) == SolveInfo("r", "", False, ())
    assert list(wire.fields(enc_key(3, 0) + enc_varint(2**70 - 1))) == [(3, 0, MASK64)]


def test_field_numbers_above_the_protobuf_maximum_are_refused() -> None:
    """Field numbers stop at 2^29-1. BuildKit's generated decoders (gogo, vtproto) cast the
    number to int32, so 2^32+1 is Ref for them; the gateway skipped it as unknown and routed
    by the other Ref. Such a message is now a DecodeError (upb refuses it too)."""
    buf = enc_key(1, 2) + b"\x01a" + enc_key(2**32 + 1, 2) + b"\x01b"
    with pytest.raises(google.protobuf.message.DecodeError):
        pb.SolveRequest.FromString(buf)
    for decode in (wire.decode_solve, wire.decode_ref):
        with pytest.raises(DecodeError, match="field number"):
            decode(buf)
    largest = enc_key(2**29 - 1, 0) + b"\x01"
    assert list(wire.fields(largest)) == [(2**29 - 1, 0, 1)]
    with pytest.raises(DecodeError):
        list(wire.fields(enc_key(2**29, 0) + b"\x01"))


def test_repeated_ref_reads_the_last_like_protobuf() -> None:
    """A Ref sent twice is the last one for BuildKit: the gateway routed by the first."""
    buf = (pb.StatusRequest(Ref="first").SerializeToString()
           + pb.StatusRequest(Ref="last").SerializeToString())
    assert pb.StatusRequest.FromString(buf).Ref == "last"
    assert wire.decode_ref(buf) == "last"
    hist = (pb.BuildHistoryRequest(Ref="first").SerializeToString()
            + pb.BuildHistoryRequest(Ref="last", EarlyExit=True).SerializeToString())
    assert wire.history_ref(HISTORY_PATHS[0], hist) == "last"


def test_the_default_profile_is_bounded() -> None:
    assert _LONG or FUZZ.max_examples == 200
