"""gateway/h2/frames.py: writing, incremental parsing, padding, size limits."""

from __future__ import annotations

import struct

import hyperframe.frame as hf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.h2 import frames as fr
from gateway.h2.frames import Frame, FrameReader, ProtocolError
from tests.fakes.frames import named

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

stream_ids = st.integers(min_value=1, max_value=2**31 - 1)
u31 = st.integers(min_value=0, max_value=2**31 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
payloads = st.binary(max_size=2048)


def parse_all(data: bytes, *, max_frame_size: int = fr.DEFAULT_MAX_FRAME_SIZE) -> list[tuple]:
    reader = FrameReader(max_frame_size=max_frame_size)
    got = reader.feed(data)
    assert reader.buffered == 0
    return [norm(f) for f in got]


def norm(f: Frame) -> tuple[int, int, int, bytes, int]:
    ftype, flags, sid, payload, flow_len = f
    return (ftype, flags, sid, bytes(payload), flow_len)


def feed_in_chunks(data: bytes, cuts: list[int], *, views: bool = False) -> list[tuple]:
    """Feeds `data` split at `cuts`; `views`: as memoryviews of fresh bytearrays (the relay's
    pooled read buffers) instead of bytes."""
    reader = FrameReader()
    out: list[tuple] = []
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        chunk = data[pos:cut]
        out += [norm(f) for f in reader.feed(memoryview(bytearray(chunk)) if views else chunk)]
        pos = cut
    assert reader.buffered == 0
    return out


# ---- round trips of the writers -------------------------------------------------------------


@FAST
@given(sid=stream_ids, data=payloads, end=st.booleans())
def test_data_round_trip(sid: int, data: bytes, end: bool) -> None:
    flags = fr.FLAG_END_STREAM if end else 0
    assert parse_all(fr.frame(fr.DATA, flags, sid, data)) == [
        (fr.DATA, flags, sid, data, len(data))
    ]


@FAST
@given(
    sid=stream_ids,
    block=st.binary(max_size=5000),
    end=st.booleans(),
    max_frame=st.integers(min_value=1, max_value=16384),
)
def test_header_block_splits_into_continuations(
    sid: int, block: bytes, end: bool, max_frame: int
) -> None:
    got = parse_all(fr.header_block(sid, block, end_stream=end, max_frame=max_frame))
    assert got[0][0] == fr.HEADERS
    assert all(f[0] == fr.CONTINUATION for f in got[1:])
    assert all(f[2] == sid for f in got)
    assert all(len(f[3]) <= max_frame for f in got)
    # END_STREAM only on HEADERS, END_HEADERS only on the last frame.
    assert bool(got[0][1] & fr.FLAG_END_STREAM) == end
    assert all(not f[1] & fr.FLAG_END_STREAM for f in got[1:])
    assert [bool(f[1] & fr.FLAG_END_HEADERS) for f in got] == [False] * (len(got) - 1) + [True]
    assert b"".join(f[3] for f in got) == block
    expected_count = max(1, -(-len(block) // max_frame))
    assert len(got) == expected_count


@FAST
@given(values=st.lists(st.tuples(st.integers(0, 0xFFFF), u32), max_size=20), ack=st.booleans())
def test_settings_round_trip(values: list[tuple[int, int]], ack: bool) -> None:
    (f,) = parse_all(fr.settings(values))
    assert (f[0], f[1], f[2]) == (fr.SETTINGS, 0, 0)
    assert fr.parse_settings(f[3]) == values
    (a,) = parse_all(fr.SETTINGS_ACK)
    assert (a[0], a[1], a[3]) == (fr.SETTINGS, fr.FLAG_ACK, b"")


@FAST
@given(sid=st.integers(0, 2**31 - 1), inc=u31)
def test_window_update_round_trip(sid: int, inc: int) -> None:
    (f,) = parse_all(fr.window_update(sid, inc))
    assert (f[0], f[2]) == (fr.WINDOW_UPDATE, sid)
    assert fr.parse_u32(f[3]) == inc


def test_parse_u32_masks_reserved_bit_and_checks_length() -> None:
    assert fr.parse_u32(struct.pack(">L", 0x80000005)) == 5
    for bad in (b"", b"\x00\x00\x01", b"\x00" * 5):
        with pytest.raises(ProtocolError) as err:
            fr.parse_u32(bad)
        assert err.value.code == fr.FRAME_SIZE_ERROR


@FAST
@given(data=st.binary(min_size=8, max_size=8), ack=st.booleans())
def test_ping_round_trip(data: bytes, ack: bool) -> None:
    assert parse_all(fr.ping(data, ack=ack)) == [
        (fr.PING, fr.FLAG_ACK if ack else 0, 0, data, 8)
    ]


@FAST
@given(sid=stream_ids, code=u32)
def test_rst_stream_round_trip(sid: int, code: int) -> None:
    (f,) = parse_all(fr.rst_stream(sid, code))
    assert (f[0], f[1], f[2]) == (fr.RST_STREAM, 0, sid)
    assert struct.unpack(">L", f[3])[0] == code


@FAST
@given(last=u31, code=u32, debug=st.binary(max_size=300))
def test_goaway_round_trip(last: int, code: int, debug: bytes) -> None:
    (f,) = parse_all(fr.goaway(last, code, debug))
    assert (f[0], f[2]) == (fr.GOAWAY, 0)
    assert fr.parse_goaway(f[3]) == (last, code, debug)


def test_goaway_too_short() -> None:
    with pytest.raises(ProtocolError) as err:
        fr.parse_goaway(b"\x00" * 7)
    assert err.value.code == fr.FRAME_SIZE_ERROR


def test_settings_payload_not_multiple_of_six() -> None:
    with pytest.raises(ProtocolError) as err:
        fr.parse_settings(b"\x00" * 7)
    assert err.value.code == fr.FRAME_SIZE_ERROR


@FAST
@given(sid=stream_ids, dep=u31, weight=st.integers(0, 255), exclusive=st.booleans())
def test_priority_frame_round_trip(sid: int, dep: int, weight: int, exclusive: bool) -> None:
    payload = struct.pack(">LB", dep | (0x80000000 if exclusive else 0), weight)
    # PRIORITY frames carry their fields as payload: nothing is stripped from them.
    assert parse_all(fr.frame(fr.PRIORITY, 0, sid, payload)) == [
        (fr.PRIORITY, 0, sid, payload, 5)
    ]


def test_reserved_stream_id_bit_is_cleared() -> None:
    raw = fr.frame_header(3, fr.DATA, 0, 0) + b"abc"
    raw = raw[:5] + struct.pack(">L", 0x80000007) + raw[9:]
    assert parse_all(raw) == [(fr.DATA, 0, 7, b"abc", 3)]


def test_frame_header_layout() -> None:
    expected = bytes.fromhex("012345 09 24 7fffffff")
    assert fr.frame_header(0x012345, 0x9, 0x24, 0x7FFFFFFF) == expected


# ---- padding and priority fields -------------------------------------------------------------


@FAST
@given(sid=stream_ids, data=payloads, pad=st.integers(0, 255), end=st.booleans())
def test_padded_data_stripped(sid: int, data: bytes, pad: int, end: bool) -> None:
    payload = bytes([pad]) + data + b"\x00" * pad
    flags = fr.FLAG_PADDED | (fr.FLAG_END_STREAM if end else 0)
    (f,) = parse_all(fr.frame(fr.DATA, flags, sid, payload))
    assert f == (fr.DATA, fr.FLAG_END_STREAM if end else 0, sid, data, len(payload))


@FAST
@given(
    sid=stream_ids,
    block=payloads,
    pad=st.integers(0, 255),
    padded=st.booleans(),
    priority=st.booleans(),
    end_stream=st.booleans(),
)
def test_padded_and_priority_headers_stripped(
    sid: int, block: bytes, pad: int, padded: bool, priority: bool, end_stream: bool
) -> None:
    payload = block
    flags = fr.FLAG_END_HEADERS | (fr.FLAG_END_STREAM if end_stream else 0)
    if priority:
        payload = struct.pack(">LB", 0x80000003, 16) + payload
        flags |= fr.FLAG_PRIORITY
    if padded:
        payload = bytes([pad]) + payload + b"\xaa" * pad
        flags |= fr.FLAG_PADDED
    (f,) = parse_all(fr.frame(fr.HEADERS, flags, sid, payload))
    kept = fr.FLAG_END_HEADERS | (fr.FLAG_END_STREAM if end_stream else 0)
    assert f == (fr.HEADERS, kept, sid, block, len(payload))


def test_padded_flag_on_other_types_is_not_stripped() -> None:
    # 0x8 on SETTINGS / PING means nothing; the payload must come out intact.
    (f,) = parse_all(fr.frame(fr.PING, fr.FLAG_PADDED, 0, b"\x03abcdefg"))
    assert f == (fr.PING, fr.FLAG_PADDED, 0, b"\x03abcdefg", 8)


@pytest.mark.parametrize(
    ("ftype", "flags", "payload", "code"),
    [
        (fr.DATA, fr.FLAG_PADDED, b"", fr.PROTOCOL_ERROR),  # no pad length byte
        (fr.DATA, fr.FLAG_PADDED, b"\x01", fr.PROTOCOL_ERROR),  # pad == payload length
        (fr.DATA, fr.FLAG_PADDED, b"\x05abcd", fr.PROTOCOL_ERROR),  # pad > payload length
        (fr.HEADERS, fr.FLAG_PADDED, b"", fr.PROTOCOL_ERROR),
        (fr.HEADERS, fr.FLAG_PADDED, b"\x04ab\x00", fr.PROTOCOL_ERROR),
        (fr.HEADERS, fr.FLAG_PRIORITY, b"\x00\x00\x00", fr.FRAME_SIZE_ERROR),
        # pad 1 leaves 4 bytes: too few for the 5 priority bytes
        (fr.HEADERS, fr.FLAG_PADDED | fr.FLAG_PRIORITY, b"\x01\x00\x00\x00\x01\x00", None),
    ],
)
def test_bad_padding_raises(ftype: int, flags: int, payload: bytes, code: int | None) -> None:
    reader = FrameReader()
    with pytest.raises(ProtocolError) as err:
        reader.feed(fr.ping(b"12345678") + fr.frame(ftype, flags, 1, payload))
    if code is not None:
        assert err.value.code == code


def test_padding_may_fill_all_but_the_pad_length_byte() -> None:
    assert parse_all(fr.frame(fr.HEADERS, fr.FLAG_PADDED, 1, b"\x03ab\x00")) == [
        (fr.HEADERS, 0, 1, b"", 4)
    ]
    assert parse_all(fr.frame(fr.DATA, fr.FLAG_PADDED, 1, b"\x00")) == [(fr.DATA, 0, 1, b"", 1)]


@FAST
@given(data=st.binary(max_size=64), extra=st.integers(1, 255))
def test_any_pad_length_beyond_payload_raises(data: bytes, extra: int) -> None:
    pad = len(data) + extra  # >= len(payload) where payload = [pad] + data
    if pad > 255:
        return
    with pytest.raises(ProtocolError) as err:
        parse_all(fr.frame(fr.DATA, fr.FLAG_PADDED, 1, bytes([pad]) + data))
    assert err.value.code == fr.PROTOCOL_ERROR


# ---- frame size limit ----------------------------------------------------------------------


@pytest.mark.parametrize("max_size", [16384, 100, 1 << 20])
def test_frame_over_max_size_raises_frame_size_error(max_size: int) -> None:
    reader = FrameReader(max_frame_size=max_size)
    ok = fr.frame(fr.DATA, 0, 1, b"x" * max_size)
    assert [norm(f)[4] for f in reader.feed(ok)] == [max_size]
    # Only the header of the oversized frame is needed to reject it.
    with pytest.raises(ProtocolError) as err:
        reader.feed(fr.frame_header(max_size + 1, fr.DATA, 0, 1))
    assert err.value.code == fr.FRAME_SIZE_ERROR


def test_oversized_frame_behind_valid_frames_raises() -> None:
    raw = fr.ping(b"12345678") + fr.frame(fr.HEADERS, 0, 1, b"y" * 16385)
    with pytest.raises(ProtocolError) as err:
        FrameReader().feed(raw)
    assert err.value.code == fr.FRAME_SIZE_ERROR


def test_oversized_frame_complete_in_straddling_read_raises() -> None:
    raw = fr.frame(fr.DATA, 0, 1, b"z" * 16385)
    reader = FrameReader()
    assert reader.feed(raw[:4]) == []
    with pytest.raises(ProtocolError) as err:
        reader.feed(raw[4:])
    assert err.value.code == fr.FRAME_SIZE_ERROR


@pytest.mark.parametrize("split", [1, 4, 5, 8])
def test_oversized_header_straddling_reads_rejected_at_once(split: int) -> None:
    # The size is checked as soon as the header is complete, not after buffering the payload.
    reader = FrameReader()
    header = fr.frame_header((1 << 24) - 1, fr.DATA, 0, 1)
    assert reader.feed(fr.ping(b"12345678") + header[:split]) != []
    with pytest.raises(ProtocolError) as err:
        reader.feed(header[split:])
    assert err.value.code == fr.FRAME_SIZE_ERROR


def test_oversized_header_fed_byte_by_byte_rejected_on_its_last_byte() -> None:
    reader = FrameReader(max_frame_size=100)
    header = fr.frame_header(101, fr.HEADERS, 0, 3)
    for i in range(8):
        assert reader.feed(header[i : i + 1]) == []
    with pytest.raises(ProtocolError):
        reader.feed(header[8:])


# ---- arbitrary splits ------------------------------------------------------------------------

frame_bytes = st.one_of(
    st.builds(lambda s, d, e: fr.frame(fr.DATA, fr.FLAG_END_STREAM if e else 0, s, d),
              stream_ids, st.binary(max_size=700), st.booleans()),
    st.builds(lambda s, d, p: fr.frame(fr.DATA, fr.FLAG_PADDED, s, bytes([p]) + d + bytes(p)),
              stream_ids, st.binary(max_size=200), st.integers(0, 40)),
    st.builds(lambda s, b, m: fr.header_block(s, b, end_stream=False, max_frame=m),
              stream_ids, st.binary(max_size=600), st.integers(1, 300)),
    st.builds(lambda v: fr.settings(v), st.lists(st.tuples(st.integers(0, 6), u32), max_size=4)),
    st.just(fr.SETTINGS_ACK),
    st.builds(lambda s, i: fr.window_update(s, i), st.integers(0, 99), u31),
    st.builds(lambda d: fr.ping(d), st.binary(min_size=8, max_size=8)),
    st.builds(lambda s, c: fr.rst_stream(s, c), stream_ids, u32),
    st.builds(lambda lsid, c, d: fr.goaway(lsid, c, d), u31, u32, st.binary(max_size=50)),
    st.builds(lambda s: fr.frame(fr.HEADERS, fr.FLAG_END_HEADERS, s, b""), stream_ids),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(frame_bytes, min_size=1, max_size=12), views=st.booleans(),
       data=st.data())
def test_any_split_parses_to_the_same_frames(parts: list[bytes], views: bool,
                                             data: st.DataObject) -> None:
    stream = b"".join(parts)
    whole = parse_all(stream)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30), label="cuts")
    assert feed_in_chunks(stream, cuts, views=views) == whole


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(frame_bytes, min_size=1, max_size=6))
def test_one_byte_chunks_parse_to_the_same_frames(parts: list[bytes]) -> None:
    stream = b"".join(parts)
    reader = FrameReader()
    got: list[tuple] = []
    for i in range(len(stream)):
        got += [norm(f) for f in reader.feed(stream[i : i + 1])]
        assert reader.buffered <= i + 1
    assert got == parse_all(stream)
    assert reader.buffered == 0


def test_buffered_reports_the_partial_frame() -> None:
    raw = fr.frame(fr.DATA, 0, 1, b"abcdef")
    reader = FrameReader()
    assert reader.feed(raw[:3]) == []
    assert reader.buffered == 3
    assert reader.feed(raw[3:11]) == []
    assert reader.buffered == 11
    (f,) = reader.feed(raw[11:] + raw[:2])
    assert bytes(f[3]) == b"abcdef"
    assert reader.buffered == 2
    assert reader.feed(b"") == []
    assert reader.buffered == 2


def test_payload_survives_later_feeds() -> None:
    # Frames handed out earlier keep their payload while the reader goes on.
    raw = fr.frame(fr.DATA, 0, 1, b"0123456789") * 2
    reader = FrameReader()
    first = reader.feed(raw[:15])
    second = reader.feed(raw[15:22])
    third = reader.feed(raw[22:])
    assert [bytes(f[3]) for f in first + second + third] == [b"0123456789"] * 2


# ---- cross-check with hyperframe -------------------------------------------------------------


def _hf_frames() -> st.SearchStrategy[hf.Frame]:
    def data(sid: int, body: bytes, pad: int | None, end: bool) -> hf.Frame:
        flags = (["END_STREAM"] if end else []) + (["PADDED"] if pad is not None else [])
        kw = {"pad_length": pad} if pad is not None else {}
        return hf.DataFrame(sid, data=body, flags=flags, **kw)

    def headers(sid: int, body: bytes, pad: int | None, prio: bool, end: bool) -> hf.Frame:
        flags = ["END_HEADERS"] + (["END_STREAM"] if end else [])
        kw: dict = {}
        if pad is not None:
            flags.append("PADDED")
            kw["pad_length"] = pad
        if prio:
            flags.append("PRIORITY")
            kw.update(depends_on=5, stream_weight=200, exclusive=True)
        return hf.HeadersFrame(sid, data=body, flags=flags, **kw)

    pads = st.none() | st.integers(0, 255)
    return st.one_of(
        st.builds(data, stream_ids, st.binary(max_size=500), pads, st.booleans()),
        st.builds(headers, stream_ids, st.binary(max_size=500), pads, st.booleans(),
                  st.booleans()),
        st.builds(lambda s, i: hf.WindowUpdateFrame(s, window_increment=i),
                  st.integers(0, 9), st.integers(1, 2**31 - 1)),
        st.builds(lambda d: hf.PingFrame(0, opaque_data=d), st.binary(min_size=8, max_size=8)),
        st.builds(lambda s, c: hf.RstStreamFrame(s, error_code=c), stream_ids, u32),
        st.builds(lambda lsid, c, d: hf.GoAwayFrame(0, last_stream_id=lsid, error_code=c,
                                                    additional_data=d), u31, u32,
                  st.binary(max_size=40)),
        st.builds(lambda v: hf.SettingsFrame(0, settings=v),
                  st.dictionaries(st.integers(1, 6), st.integers(0, 2**31 - 1), max_size=5)),
        st.builds(lambda s, d, w: hf.PriorityFrame(s, depends_on=d, stream_weight=w),
                  stream_ids, u31, st.integers(0, 255)),
    )


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(_hf_frames(), min_size=1, max_size=8))
def test_parses_frames_serialized_by_hyperframe(frames: list[hf.Frame]) -> None:
    raw = b"".join(f.serialize() for f in frames)
    got = named(FrameReader().feed(raw))
    assert len(got) == len(frames)
    for mine, ref in zip(got, frames, strict=True):
        assert mine.type == ref.type
        assert mine.stream_id == ref.stream_id
        assert mine.flow_len == len(ref.serialize()) - 9
        if isinstance(ref, hf.DataFrame | hf.HeadersFrame):
            assert bytes(mine.payload) == ref.data
            assert not mine.flags & (fr.FLAG_PADDED | fr.FLAG_PRIORITY)
            assert bool(mine.flags & fr.FLAG_END_STREAM) == ("END_STREAM" in ref.flags)
        elif isinstance(ref, hf.WindowUpdateFrame):
            assert fr.parse_u32(mine.payload) == ref.window_increment
        elif isinstance(ref, hf.PingFrame):
            assert bytes(mine.payload) == ref.opaque_data
        elif isinstance(ref, hf.GoAwayFrame):
            assert fr.parse_goaway(mine.payload) == (
                ref.last_stream_id, ref.error_code, ref.additional_data
            )
        elif isinstance(ref, hf.SettingsFrame):
            assert dict(fr.parse_settings(mine.payload)) == ref.settings
        elif isinstance(ref, hf.RstStreamFrame):
            assert struct.unpack(">L", mine.payload)[0] == ref.error_code


@FAST
@given(sid=stream_ids, block=st.binary(max_size=3000), max_frame=st.integers(1, 1000),
       end=st.booleans())
def test_hyperframe_parses_our_header_block(
    sid: int, block: bytes, max_frame: int, end: bool
) -> None:
    raw = memoryview(fr.header_block(sid, block, end_stream=end, max_frame=max_frame))
    pos = 0
    parsed = []
    while pos < len(raw):
        f, length = hf.Frame.parse_frame_header(raw[pos : pos + 9])
        f.parse_body(raw[pos + 9 : pos + 9 + length])
        parsed.append(f)
        pos += 9 + length
    assert isinstance(parsed[0], hf.HeadersFrame)
    assert all(isinstance(f, hf.ContinuationFrame) for f in parsed[1:])
    assert b"".join(f.data for f in parsed) == block
    assert "END_HEADERS" in parsed[-1].flags
    assert ("END_STREAM" in parsed[0].flags) == end
