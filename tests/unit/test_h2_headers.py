"""gateway/h2/headers.py: encoding and decoding, each with a persistent table."""

from __future__ import annotations

import hpack
import pytest
from hpack.table import HeaderTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.h2 import headers as hd
from gateway.h2.frames import COMPRESSION_ERROR, ProtocolError
from tests.fakes.frames import fresh_block as block

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STATIC = list(HeaderTable.STATIC_TABLE)
static_pairs = st.sampled_from(STATIC)
static_names = st.sampled_from(sorted({n for n, _ in STATIC}))
names = st.one_of(
    static_names,
    st.binary(min_size=1, max_size=40),
    st.sampled_from([b"grpc-status", b"grpc-message", b"x-docker-expose-session-sharedkey",
                     b"buildkit-controlapi-buildid", b"content-type"]),
)
values = st.one_of(st.binary(max_size=200), st.sampled_from([v for _, v in STATIC]))
fields = st.one_of(static_pairs, st.tuples(names, values), st.tuples(static_names, values))
header_lists = st.lists(fields, max_size=25)


def reference_decode(block: bytes, decoder: hpack.Decoder | None = None) -> list:
    decoder = decoder or hpack.Decoder(max_header_list_size=1 << 24)
    return [(bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)]


@FAST
@given(headers=header_lists)
def test_encode_decodes_with_independent_decoder(headers: list[tuple[bytes, bytes]]) -> None:
    encoded = block(headers)
    assert reference_decode(encoded) == headers
    assert hd.HeaderDecoder(max_header_list_size=1 << 24).decode(encoded) == headers


def test_repeated_names_keep_order_and_count() -> None:
    headers = [(b"a", b"1"), (b":path", b"/x"), (b"a", b"2"), (b"a", b"1"), (b"set-cookie", b"")]
    assert reference_decode(block(headers)) == headers
    assert hd.get(headers, b"a") == b"1"
    assert hd.get(headers, b"missing") is None
    assert hd.get_all(headers, b"a") == [b"1", b"2", b"1"]


@pytest.mark.parametrize("size", [127, 128, 16383, 16384, 40_000, 70_000])
def test_big_binary_values(size: int) -> None:
    value = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    headers = [(b"grpc-status", b"2"), (b"grpc-message", value), (b"x-bin", value[::-1])]
    encoded = block(headers)
    assert reference_decode(encoded) == headers
    assert hd.HeaderDecoder(max_header_list_size=1 << 20).decode(encoded) == headers


def test_first_encodings_of_each_kind_of_field() -> None:
    assert block([(b":method", b"POST")]) == b"\x83"
    assert block([(b":status", b"200")]) == b"\x88"
    # Name in the static table, value not: literal with incremental indexing, indexed name.
    assert block([(b":path", b"/a")]) == b"\x44\x02/a"
    # Unknown name: literal with incremental indexing, new name.
    assert block([(b"te", b"trailers")]) == b"\x40\x02te\x08trailers"
    # A deadline: literal without indexing (it changes on every call).
    assert block([(b"grpc-timeout", b"5S")]) == b"\x00\x0cgrpc-timeout\x025S"


@settings(max_examples=60, deadline=None)
@given(lists=st.lists(header_lists, min_size=2, max_size=6), data=st.data())
def test_fresh_encoder_blocks_decode_with_a_fresh_or_used_decoder(
    lists: list[list[tuple[bytes, bytes]]], data: st.DataObject
) -> None:
    blocks = [block(h) for h in lists]
    order = data.draw(st.permutations(range(len(blocks))), label="order")
    # A used decoder: its table holds entries a peer's indexing encoder put there.
    used = hd.HeaderDecoder(max_header_list_size=1 << 24)
    peer = hpack.Encoder()
    used.decode(peer.encode([(b"x-a", b"1"), (b"grpc-message", b"m" * 50), (b":path", b"/q")]))
    for i in order:
        assert used.decode(blocks[i]) == lists[i]
        assert hd.HeaderDecoder(max_header_list_size=1 << 24).decode(blocks[i]) == lists[i]


@settings(max_examples=80, deadline=None)
@given(lists=st.lists(header_lists, min_size=1, max_size=8))
def test_peer_dynamic_table_across_blocks(lists: list[list[tuple[bytes, bytes]]]) -> None:
    # The peer indexes into its 4096-byte table before it applies our SETTINGS size 0.
    peer = hpack.Encoder()
    decoder = hd.HeaderDecoder(max_header_list_size=1 << 24)
    for headers in lists + lists:  # the second round hits table entries from the first
        block = peer.encode(headers, huffman=True)
        assert decoder.decode(block) == headers


def test_peer_indexed_fields_shrink_blocks_and_still_decode() -> None:
    peer = hpack.Encoder()
    decoder = hd.HeaderDecoder(max_header_list_size=1 << 20)
    h = [(b":path", b"/moby.buildkit.v1.Control/Solve"), (b"x-docker-expose-session-uuid", b"u1")]
    first = peer.encode(h)
    second = peer.encode(h)
    assert len(second) < len(first)  # the second block uses the dynamic table
    assert decoder.decode(first) == h
    assert decoder.decode(second) == h
    # A decoder that missed the first block cannot decode the second.
    with pytest.raises(ProtocolError) as err:
        hd.HeaderDecoder(max_header_list_size=1 << 20).decode(second)
    assert err.value.code == COMPRESSION_ERROR


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=60))
def test_garbage_is_a_compression_error_or_decodes(garbage: bytes) -> None:
    decoder = hd.HeaderDecoder(max_header_list_size=4096)
    try:
        result = decoder.decode(garbage)
    except ProtocolError as exc:
        assert exc.code == COMPRESSION_ERROR
    else:
        assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in result)


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # index far beyond the tables
        b"\xbe",  # dynamic index 62 with an empty table
        b"\x00\x05ab",  # truncated name
        b"\x04\x85abc",  # truncated huffman value
        b"\x3f\xe1\xff\x03",  # table size update above the 4096 allowed
        b"\x04\x81\xff",  # huffman EOS / invalid padding
    ],
)
def test_malformed_blocks_raise_compression_error(block: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        hd.HeaderDecoder(max_header_list_size=1 << 20).decode(block)
    assert err.value.code == COMPRESSION_ERROR


def test_oversized_header_list_is_compression_error() -> None:
    big = block([(b"grpc-message", b"m" * 5000)])
    assert hd.HeaderDecoder(max_header_list_size=6000).decode(big)
    with pytest.raises(ProtocolError) as err:
        hd.HeaderDecoder(max_header_list_size=4000).decode(big)
    assert err.value.code == COMPRESSION_ERROR
    many = block([(b"x-k", b"v")] * 200)  # 200 x (3 + 1 + 32) bytes
    with pytest.raises(ProtocolError) as err:
        hd.HeaderDecoder(max_header_list_size=7000).decode(many)
    assert err.value.code == COMPRESSION_ERROR


def test_decoder_accepts_multi_megabyte_lists_when_allowed() -> None:
    value = b"trace\n" * 200_000  # 1.2 MB
    encoded = block([(b"grpc-message", value)])
    assert hd.HeaderDecoder(max_header_list_size=16 << 20).decode(encoded) == [
        (b"grpc-message", value)
    ]


def test_repeated_block_is_decoded_once_while_the_table_is_unchanged() -> None:
    peer = hpack.Encoder()
    decoder = hd.HeaderDecoder(max_header_list_size=1 << 20)
    h = [(b":path", b"/containerd.services.content.v1.Content/Info"), (b"te", b"trailers")]
    decoder.decode(peer.encode(h))  # the literals enter both tables
    indexed = peer.encode(h)
    first = decoder.decode(indexed)
    assert first == h and decoder.size == hd.list_size(h)
    assert decoder.decode(indexed) is first  # remembered: the table did not change
    # A literal with indexing changes the table: the same bytes now mean something else.
    h2 = [(b"x-new", b"v")]
    decoder.decode(peer.encode(h2))
    shifted = peer.encode(h)  # the peer's indexes moved by one entry
    assert decoder.decode(shifted) == h
    assert decoder.decode(indexed) != h  # the old bytes, decoded afresh against the new table


@settings(max_examples=80, deadline=None)
@given(lists=st.lists(st.sampled_from([
    [(b":status", b"200"), (b"content-type", b"application/grpc")],
    [(b"grpc-status", b"0")],
    [(b"grpc-status", b"5"), (b"grpc-message", b"not found")],
    [(b"x-a", b"1"), (b"x-b", b"2")],
]), min_size=1, max_size=30))
def test_remembered_blocks_agree_with_the_reference_decoder(
        lists: list[list[tuple[bytes, bytes]]]) -> None:
    peer = hpack.Encoder()
    ref = hpack.Decoder(max_header_list_size=1 << 24)
    decoder = hd.HeaderDecoder(max_header_list_size=1 << 24)
    for headers in lists:
        block = peer.encode(headers)
        assert decoder.decode(block) == reference_decode(block, ref) == headers
        assert decoder.size == hd.list_size(headers)


# ---- HeaderEncoder: a dynamic table in step with one peer's decoder ----------------------

limits = st.sampled_from([0, 1, 64, 100, 256, 1024, 4096])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.one_of(header_lists.map(lambda h: ("block", h)),
                                limits.map(lambda n: ("limit", n))), max_size=30))
def test_table_encoder_stays_in_step_with_independent_decoders(steps: list) -> None:
    # hpack's decoder and ours read the same stream of blocks, with the peer lowering its
    # SETTINGS_HEADER_TABLE_SIZE in between: every block decodes to its list.
    encoder = hd.HeaderEncoder()
    reference = hpack.Decoder(max_header_list_size=1 << 24)
    ours = hd.HeaderDecoder(max_header_list_size=1 << 24)
    for kind, value in steps:
        if kind == "limit":
            encoder.peer_limit(value)
            continue
        block = encoder.encode(value)
        assert reference_decode(block, reference) == value
        assert ours.decode(block) == value
        assert reference.header_table.maxsize == encoder.limit


def test_repeated_requests_become_indexes() -> None:
    request = [(b":method", b"POST"), (b":scheme", b"http"),
               (b":path", b"/containerd.services.content.v1.Content/Info"),
               (b":authority", b"gateway:1234"), (b"te", b"trailers"),
               (b"content-type", b"application/grpc"), (b"user-agent", b"grpc-go/1.59.0"),
               (b"grpc-timeout", b"9999981u")]
    encoder = hd.HeaderEncoder()
    decoder = hpack.Decoder()
    first = encoder.encode(request)
    assert reference_decode(first, decoder) == request
    again = [*request[:-1], (b"grpc-timeout", b"9999562u")]
    second = encoder.encode(again)
    assert reference_decode(second, decoder) == again
    # Seven one-byte indexes; the deadline stays a literal and out of the table.
    assert len(second) == 7 + len(block([again[-1]]))
    assert all(b"9999" not in bytes(n + v) for n, v in
               ((e[0], e[1]) for e in decoder.header_table.dynamic_entries))
    assert encoder.encode(again) == second  # the table did not change: same block


def test_credentials_are_never_indexed() -> None:
    encoder = hd.HeaderEncoder()
    block = encoder.encode([(b"authorization", b"Bearer t")])
    assert block[0] & 0xF0 == 0x10  # literal never indexed, RFC 7541 6.2.3
    assert reference_decode(block) == [(b"authorization", b"Bearer t")]
    assert encoder.encode([(b"authorization", b"Bearer t")]) == block


def test_lowered_peer_limit_leads_the_next_block_with_a_size_update() -> None:
    encoder = hd.HeaderEncoder()
    decoder = hpack.Decoder()
    headers = [(b"x-a", b"1"), (b"x-b", b"2")]
    reference_decode(encoder.encode(headers), decoder)
    encoder.peer_limit(0)
    block = encoder.encode(headers)
    assert block[0] == 0x20  # size update to 0 first
    assert reference_decode(block, decoder) == headers
    assert decoder.header_table.maxsize == 0
    encoder.peer_limit(8192)  # a raised setting is not followed
    assert encoder.limit == 0
    assert encoder.encode(headers)[0] != 0x20


def test_error_messages_and_timestamps_stay_out_of_the_table() -> None:
    encoder = hd.HeaderEncoder()
    decoder = hpack.Decoder()
    for message in (b"no such job a", b"no such job b", b""):
        block = encoder.encode([(b"grpc-status", b"5"), (b"grpc-message", message),
                                (b"buildkit-current-timestamp", b"2026-12-07T13:00:00Z")])
        reference_decode(block, decoder)
    entries = [(bytes(n), bytes(v)) for n, v in decoder.header_table.dynamic_entries]
    assert (b"grpc-status", b"5") in entries
    assert (b"grpc-message", b"") in entries  # the one value that repeats
    assert not any(n == b"buildkit-current-timestamp" or (n == b"grpc-message" and v)
                   for n, v in entries)
