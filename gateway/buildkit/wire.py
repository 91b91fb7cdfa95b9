"""The few BuildKit messages and gRPC framing details the gateway reads.

Design: a hand-written protobuf reader for the handful of fields placement needs (field numbers
from buildkit-wire.md section 2), so the relay never builds full message objects. Unknown fields
are skipped; malformed input raises `DecodeError` with a message naming what was wrong.
Pure functions, no I/O.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

GRPC_PREFIX = struct.Struct(">BL")  # compressed flag, message length
MAX_MESSAGE = 16 << 20  # BuildKit's send and receive limit (containerd defaults)

SESSION_UUID = b"x-docker-expose-session-uuid"
SESSION_SHAREDKEY = b"x-docker-expose-session-sharedkey"
BUILD_ID = b"buildkit-controlapi-buildid"
LOCAL_SESSION_ATTR = "local-sessionid:"

_CONTROL = "/moby.buildkit.v1.Control/"
_LLB = "/moby.buildkit.v1.frontend.LLBBridge/"


class DecodeError(ValueError):
    """A message the gateway must read could not be decoded."""


class CallClass(enum.Enum):
    """How a call is routed (buildkit-wire.md section 1)."""

    SOLVE = "solve"  # places a build
    STATUS = "status"  # follows the build named by its Ref
    SESSION = "session"  # follows the build that names its session
    LLB = "llb"  # follows the build named by its buildid header
    CONTROL = "control"  # answered by the gateway's control server (caches, fan-out)
    HISTORY = "history"  # ListenBuildHistory/UpdateBuildHistory: the Ref's owner, or fan-out
    CONTENT = "content"  # containerd content reads: the replica of the last history call
    OTHER = "other"  # traces, unknown methods: bound replica or the key's replica


_BY_PATH = {
    _CONTROL + "Solve": CallClass.SOLVE,
    _CONTROL + "Status": CallClass.STATUS,
    _CONTROL + "Session": CallClass.SESSION,
    _CONTROL + "ListWorkers": CallClass.CONTROL,
    _CONTROL + "Info": CallClass.CONTROL,
    _CONTROL + "DiskUsage": CallClass.CONTROL,
    _CONTROL + "Prune": CallClass.CONTROL,
    _CONTROL + "ListenBuildHistory": CallClass.HISTORY,
    _CONTROL + "UpdateBuildHistory": CallClass.HISTORY,
    "/grpc.health.v1.Health/Check": CallClass.CONTROL,
    "/grpc.health.v1.Health/Watch": CallClass.CONTROL,
}


def classify(path: str) -> CallClass:
    cls = _BY_PATH.get(path)
    if cls is not None:
        return cls
    if path.startswith(_LLB):
        return CallClass.LLB
    if path.startswith("/containerd.services.content.v1.Content/"):
        return CallClass.CONTENT
    return CallClass.OTHER


def history_ref(path: str, message: bytes) -> str:
    """The Ref of a history call: field 2 of BuildHistoryRequest, field 1 otherwise."""
    return decode_ref(message, field=2 if path.endswith("/ListenBuildHistory") else 1)


_U64 = (1 << 64) - 1
_MAX_FIELD = (1 << 29) - 1  # the largest protobuf field number


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:  # 64 bits: a 10th byte's higher bits are dropped, as BuildKit's decoders do
            return result & _U64, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yields (field number, wire type, value) for every field of a protobuf message."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wtype = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if number > _MAX_FIELD:  # invalid; BuildKit's decoders would wrap it to another field
            raise DecodeError(f"field number {number} above {_MAX_FIELD}")
        if wtype == 0:
            value, pos = _varint(buf, pos)
            yield number, wtype, value
        elif wtype == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise DecodeError(f"field {number} runs past the message end")
            yield number, wtype, buf[pos : pos + size]
            pos += size
        elif wtype == 1:
            pos += 8
        elif wtype == 5:
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wtype} for field {number}")
        if pos > end:
            raise DecodeError("truncated fixed-width field")


def _text(value: int | bytes, what: str) -> str:
    if not isinstance(value, bytes):
        raise DecodeError(f"{what} is not a length-delimited field")
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not UTF-8") from exc


@dataclass(frozen=True, slots=True)
class SolveInfo:
    """What placement reads from a Control/Solve request."""

    ref: str
    session: str
    internal: bool
    shared_sessions: tuple[str, ...]  # FrontendAttrs local-sessionid:* values, SourcePolicySession

    def sessions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for s in (self.session, *self.shared_sessions) if s))


def decode_solve(buf: bytes) -> SolveInfo:
    ref = session = ""
    internal = False
    shared: list[str] = []
    for number, _wt, value in fields(buf):
        if number == 1:
            ref = _text(value, "SolveRequest.Ref")
        elif number == 5:
            session = _text(value, "SolveRequest.Session")
        elif number == 11:
            internal = bool(value)
        elif number == 15:
            shared.append(_text(value, "SolveRequest.SourcePolicySession"))
        elif number == 7 and isinstance(value, bytes):
            key = val = ""
            for n, _w, v in fields(value):
                if n == 1:
                    key = _text(v, "FrontendAttrs key")
                elif n == 2:
                    val = _text(v, "FrontendAttrs value")
            if key.startswith(LOCAL_SESSION_ATTR) and val:
                shared.append(val)
    if not ref:
        raise DecodeError("SolveRequest has no Ref")
    return SolveInfo(ref, session, internal, tuple(dict.fromkeys(s for s in shared if s)))


def decode_ref(buf: bytes, *, field: int = 1) -> str:
    """The Ref of a StatusRequest (field 1) or BuildHistoryRequest (field 2): the last one, as
    protobuf reads a repeated singular field (and as BuildKit does)."""
    ref = ""
    for number, _wt, value in fields(buf):
        if number == field:
            ref = _text(value, "Ref")
    return ref


def message_size(prefix: bytes) -> int:
    """The length in a 5-byte gRPC message prefix (checked like `first_message`)."""
    flag, size = GRPC_PREFIX.unpack_from(prefix)
    if flag:
        raise DecodeError("compressed request message (grpc-encoding) is not supported")
    if size > MAX_MESSAGE:
        raise DecodeError(f"request message of {size} bytes exceeds {MAX_MESSAGE}")
    return int(size)


def first_message(buf: bytes | bytearray) -> bytes | None:
    """The first gRPC message in `buf` once complete, else None. Compressed ones raise."""
    if len(buf) < 5:
        return None
    flag, size = GRPC_PREFIX.unpack_from(buf)
    if flag:
        raise DecodeError("compressed request message (grpc-encoding) is not supported")
    if size > MAX_MESSAGE:
        raise DecodeError(f"request message of {size} bytes exceeds {MAX_MESSAGE}")
    if len(buf) < 5 + size:
        return None
    return bytes(buf[5 : 5 + size])


def frame_message(payload: bytes) -> bytes:
    return GRPC_PREFIX.pack(0, len(payload)) + payload


# ---- encoding the gateway's own messages ---------------------------------------------------


def _enc_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _enc_bytes(number: int, value: bytes) -> bytes:
    return _enc_varint(number << 3 | 2) + _enc_varint(len(value)) + value


def _enc_timestamp(number: int, unix_ns: int) -> bytes:
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    body = _enc_varint(1 << 3) + _enc_varint(seconds)
    if nanos:
        body += _enc_varint(2 << 3) + _enc_varint(nanos)
    return _enc_bytes(number, body)


def status_vertex(*, digest: str, name: str, started_ns: int,
                  completed_ns: int | None = None) -> bytes:
    """A StatusResponse carrying one Vertex (digest 1, name 3, started 5, completed 6)."""
    vertex = _enc_bytes(1, digest.encode()) + _enc_bytes(3, name.encode())
    vertex += _enc_timestamp(5, started_ns)
    if completed_ns is not None:
        vertex += _enc_timestamp(6, completed_ns)
    return _enc_bytes(1, vertex)


def history_request(*, ref: str, early_exit: bool) -> bytes:
    """A BuildHistoryRequest{Ref (field 2), EarlyExit (field 3)}."""
    body = _enc_bytes(2, ref.encode()) if ref else b""
    if early_exit:
        body += _enc_varint(3 << 3) + b"\x01"
    return body
