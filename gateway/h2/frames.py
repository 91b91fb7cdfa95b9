"""HTTP/2 frames (RFC 9113 section 4 and 6): parsing a byte stream and writing frames.

Design: the relay's hot path is DATA, so parsing is a tight loop over one memoryview of each
read. A frame's payload is a memoryview slice of the bytes the transport handed us; nothing is
copied except the single frame that straddles two reads, which is completed from the head of the
next read (gluing the whole unparsed tail onto every read would copy each chunk again).

Invariants:
- `FrameReader.feed` returns frames in wire order; the concatenation of any split of a byte
  stream yields the same frames as the whole stream.
- Padding is stripped from DATA and HEADERS, and the priority fields from HEADERS; the PADDED
  and PRIORITY flags are cleared on what is returned, while a frame's `flow_len` keeps the length
  that counts against flow-control windows (the whole payload, padding included).
- A frame larger than the receiver's SETTINGS_MAX_FRAME_SIZE, or malformed padding, raises
  `ProtocolError` (a connection error, RFC 9113 section 5.4.1).
No I/O here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

# Frame types.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD

ERROR_NAMES = {
    NO_ERROR: "NO_ERROR",
    PROTOCOL_ERROR: "PROTOCOL_ERROR",
    INTERNAL_ERROR: "INTERNAL_ERROR",
    FLOW_CONTROL_ERROR: "FLOW_CONTROL_ERROR",
    SETTINGS_TIMEOUT: "SETTINGS_TIMEOUT",
    STREAM_CLOSED: "STREAM_CLOSED",
    FRAME_SIZE_ERROR: "FRAME_SIZE_ERROR",
    REFUSED_STREAM: "REFUSED_STREAM",
    CANCEL: "CANCEL",
    COMPRESSION_ERROR: "COMPRESSION_ERROR",
    CONNECT_ERROR: "CONNECT_ERROR",
    ENHANCE_YOUR_CALM: "ENHANCE_YOUR_CALM",
    INADEQUATE_SECURITY: "INADEQUATE_SECURITY",
    HTTP_1_1_REQUIRED: "HTTP_1_1_REQUIRED",
}

# Settings identifiers.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_MAX_FRAME_SIZE = 16384
DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
FRAME_HEADER_LEN = 9

_HEADER = struct.Struct(">HBBBL")  # length hi16, length lo8, type, flags, stream id
frame_header_struct = _HEADER  # for hot paths that pack headers inline
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")


class ProtocolError(Exception):
    """A connection error: the connection must be closed with GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamError(ProtocolError):
    """An error confined to one stream: reset it with RST_STREAM(code), keep the connection."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(code, message)
        self.stream_id = stream_id


Frame = tuple[int, int, int, memoryview, int]
"""A parsed frame: (type, flags, stream id, payload, flow_len), where flow_len is the bytes
counted by flow control (DATA: the whole payload incl. padding). A plain tuple, not a
NamedTuple: making one per frame is a third of the parser's time (bench/unary_micro.py)."""


def _strip(ftype: int, flags: int, payload: memoryview) -> tuple[int, memoryview]:
    """Removes padding (DATA, HEADERS) and priority fields (HEADERS); clears those flags."""
    if flags & FLAG_PADDED and ftype in (DATA, HEADERS):
        if not payload:
            raise ProtocolError(PROTOCOL_ERROR, "padded frame without pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise ProtocolError(PROTOCOL_ERROR, "padding exceeds frame payload")
        payload = payload[1 : len(payload) - pad]
        flags &= ~FLAG_PADDED
    if ftype == HEADERS and flags & FLAG_PRIORITY:
        if len(payload) < 5:
            raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS priority fields truncated")
        payload = payload[5:]
        flags &= ~FLAG_PRIORITY
    return flags, payload


class FrameReader:
    """Incremental frame parser for one direction of one connection."""

    __slots__ = ("_have", "_max_frame", "_parts")

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._max_frame = max_frame_size
        self._parts: list[memoryview] = []  # the unparsed tail: views of earlier reads
        self._have = 0

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return self._have

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        end = len(view)
        pos = 0
        if self._have:
            # Complete the one frame that straddles reads; the earlier parts are views of the
            # earlier reads, so the frame is copied once, here.
            if self._have < FRAME_HEADER_LEN:
                take = min(FRAME_HEADER_LEN - self._have, end)
                self._parts.append(view[:take])
                self._have += take
                pos = take
                if self._have < FRAME_HEADER_LEN:
                    return frames
                self._parts = [memoryview(b"".join(self._parts))]
            hi, lo, _t, _f, _s = _HEADER.unpack_from(self._parts[0])
            length = (hi << 8) | lo
            if length > self._max_frame:
                raise ProtocolError(
                    FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {self._max_frame}"
                )
            need = FRAME_HEADER_LEN + length - self._have
            if need > end - pos:
                self._parts.append(view[pos:])
                self._have += end - pos
                return frames
            self._parts.append(view[pos : pos + need])
            pos += need
            whole = b"".join(self._parts)
            self._parts = []
            self._have = 0
            self._parse(memoryview(whole), 0, len(whole), frames)
        rest = self._parse(view, pos, end, frames)
        if rest < end:
            self._parts = [view[rest:]]
            self._have = end - rest
        return frames

    def _parse(self, view: memoryview, pos: int, end: int, frames: list[Frame]) -> int:
        """Parses whole frames from view[pos:end]; returns where the unparsed rest begins."""
        unpack = _HEADER.unpack_from
        max_frame = self._max_frame
        append = frames.append
        while end - pos >= FRAME_HEADER_LEN:
            hi, lo, ftype, flags, sid = unpack(view, pos)
            length = (hi << 8) | lo
            if length > max_frame:
                raise ProtocolError(
                    FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {max_frame}"
                )
            stop = pos + FRAME_HEADER_LEN + length
            if stop > end:
                break
            payload = view[pos + FRAME_HEADER_LEN : stop]
            if flags & (FLAG_PADDED | FLAG_PRIORITY) and ftype in (DATA, HEADERS):
                flags, payload = _strip(ftype, flags, payload)
            append((ftype, flags, sid & 0x7FFFFFFF, payload, length))
            pos = stop
        return pos


# ---- writing -------------------------------------------------------------------------------


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id)


def frame(ftype: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    return frame_header(len(payload), ftype, flags, stream_id) + payload


def settings(values: Iterable[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values))


SETTINGS_ACK = frame(SETTINGS, FLAG_ACK, 0)


def parse_settings(payload: memoryview | bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def parse_u32(payload: memoryview | bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError(FRAME_SIZE_ERROR, "frame payload must be 4 bytes")
    value: int = _U32.unpack_from(payload)[0]
    return value & 0x7FFFFFFF


def parse_code(payload: memoryview | bytes) -> int:
    """The 32-bit error code of RST_STREAM (no reserved bit to mask)."""
    if len(payload) != 4:
        raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM payload must be 4 bytes")
    code: int = _U32.unpack_from(payload)[0]
    return code


def ping(data: bytes, *, ack: bool = False) -> bytes:
    return frame(PING, FLAG_ACK if ack else 0, 0, data)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code) + debug)


def parse_goaway(payload: memoryview | bytes) -> tuple[int, int, bytes]:
    if len(payload) < 8:
        raise ProtocolError(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
    last = _U32.unpack_from(payload, 0)[0] & 0x7FFFFFFF
    code = _U32.unpack_from(payload, 4)[0]
    return last, code, bytes(payload[8:])


def header_block(stream_id: int, block: bytes, *, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS (+ CONTINUATION) frames carrying `block`, each at most `max_frame` long.

    Slices a memoryview: each byte is copied once (slicing bytes made large blocks quadratic).
    """
    flags = FLAG_END_STREAM if end_stream else 0
    n = len(block)
    if n <= max_frame:
        return _HEADER.pack(n >> 8, n & 0xFF, HEADERS, flags | FLAG_END_HEADERS,
                            stream_id) + block
    view = memoryview(block)
    parts = [frame(HEADERS, flags, stream_id, view[:max_frame])]
    for at in range(max_frame, len(block), max_frame):
        last = at + max_frame >= len(block)
        parts.append(frame(CONTINUATION, FLAG_END_HEADERS if last else 0, stream_id,
                           view[at:at + max_frame]))
    return b"".join(parts)
